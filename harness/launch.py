"""Run one cell (`run_cell`): in this process (`harness.cell.train_cell`), or, a cell of more than one
rank (`train.nproc` x `train.nnodes`), as that many rank processes whose ends become its status:

    local   torchrun's own engine (`torch.distributed.launcher.elastic_launch`): N rank processes of
            `python -m harness.launch JOB` on this node; with `train.nnodes` > 1, on each of that
            many nodes, which meet at a c10d rendezvous per cell (`NodeLaunch`)
    ray     Ray Train's `TorchTrainer` with N workers (any node of the Ray cluster; `--ray-address`)

Either way the ranks run `rank_main`: join the process group (gloo on the CPU, NCCL on GPUs, with
`train.dist_timeout` on every collective), train the cell with `harness.sharded.ShardedTrainer`
and leave their outcome in the cell's `.ranks/` folder: rank 0 the summary (`result.json`), a rank
that raises its step and reason (`failure_rank<r>.json`) before it exits, which makes the launcher
stop the other ranks. This process (the grid's) writes status.json: `done`, or `failed` with the
rank and reason of the first failure; a rank killed without a word (`kill -9`, the out-of-memory
killer) is named from the launcher's report of its exit signal.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from harness import checkpoints, store
from harness.cell import Cell, NodeLaunch, begin_cell, say, train_cell, write_error
from harness.errors import HarnessError

JOB_DIR = ".ranks"


def check_nodes(nnodes: int, node: NodeLaunch, backend: str, workers: int) -> None:
    """Refuse, with what is valid, a multi-node launch that cannot meet."""
    if not 0 <= node.rank < nnodes:
        raise HarnessError(f"--node-rank must be in 0..{nnodes - 1} for --nnodes {nnodes}, got {node.rank}")
    if nnodes == 1:
        return
    if backend != "local":
        raise HarnessError("--nnodes is for the local backend (plain torchrun on every node); with --backend ray "
                           "give the total ranks as --nproc and Ray places them on the cluster's nodes")
    host, _, port = node.endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HarnessError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT of node 0, reachable from every node "
                           f"(e.g. node0.cluster:29500), got {node.endpoint!r}")
    if workers != 1:
        raise HarnessError(f"--nnodes {nnodes} runs one cell at a time on every node (--workers 1), got --workers {workers}")


def run_cell(cell: Cell, cache_dir: Path | None = None, ckpt_every: int = 0, progress: bool = False,
             backend: str = "local") -> dict[str, Any]:
    """Run one cell to the end in this process, resuming from its newest checkpoint that passes
    verification when its configuration is unchanged; write its status.json; return that status.
    An exception inside the cell (a non-finite loss, out of memory, a bug) marks it failed and
    does not propagate, except bad input (`HarnessError`, e.g. a model that cannot load) and a
    store that cannot be written (full disk, read-only), which the grid stops on. A cell of more
    than one rank (`train.nproc` x `train.nnodes`) runs as that many (`run_cell_ranks`, torchrun or Ray Train)."""
    try:
        if cell.cfg.train.world_size > 1:
            return run_cell_ranks(cell, cache_dir, ckpt_every, progress, backend)
        return train_cell(cell, cache_dir, ckpt_every, progress)
    except OSError as exc:
        reason = write_error(cell, exc)
        if reason is None:
            raise
        status = {"state": "interrupted", "reason": reason, "fatal": True, "step": store.last_step(cell.path)}
        try:  # resumed by the next run once there is room; the write itself may fail again
            store.write_status(cell.path, "interrupted", reason=reason, step=status["step"])
        except OSError:
            pass
        return status


def run_cell_ranks(cell: Cell, cache_dir: Path | None, ckpt_every: int, progress: bool, backend: str = "local") -> dict:
    """Run `cell` as `train.nproc` ranks (on each of `train.nnodes` nodes) to the end, resuming like a
    one-process cell; write and return its status. A failing rank fails the cell and nothing else.
    On a node other than the leader: start this node's ranks and return how they ended; the leader
    checks and resets the cell and writes its status."""
    results = Path(cell.path) / JOB_DIR  # the ranks' outcome files, on the shared store
    if not cell.node.leader:
        return follow_cell(cell, results, cache_dir, ckpt_every, progress)
    info, _ = begin_cell(cell)
    job = results  # node 0's job file sits beside the ranks' outcome files
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    write_job(job, cell, results, cache_dir, ckpt_every, progress)
    launcher_failures: dict[int, str] = {}
    try:
        if backend == "ray":
            launcher_failures = launch_ray(cell, job)
        else:
            launcher_failures = launch_torchrun(cell, job)
    except KeyboardInterrupt:
        store.write_status(cell.path, "interrupted", step=store.last_step(cell.path), reason="interrupted", **info)
        raise
    status = outcome(cell, job, launcher_failures, info)
    shutil.rmtree(job, ignore_errors=True)
    return status


def write_job(job: Path, cell, results: Path, cache_dir: Path | None, ckpt_every: int, progress: bool) -> None:
    with open(job / "job.pkl", "wb") as fh:
        pickle.dump({"cell": cell, "results": results, "cache_dir": cache_dir, "ckpt_every": ckpt_every,
                     "progress": progress}, fh)


def follow_cell(cell, results: Path, cache_dir: Path | None, ckpt_every: int, progress: bool) -> dict:
    """A follower node's share of a cell: its job file stays on this node (the leader may reset the
    cell's folder before the ranks meet); the outcome it returns is this node's view only."""
    job = Path(tempfile.mkdtemp(prefix=f"harness-node{cell.node.rank}-"))
    try:
        write_job(job, cell, results, cache_dir, ckpt_every, progress)
        failures = launch_torchrun(cell, job)
    finally:
        shutil.rmtree(job, ignore_errors=True)
    if failures:
        rank, why = min(failures.items())
        return {"state": "failed", "reason": f"node {cell.node.rank}, rank {rank}: {why}", "step": store.last_step(cell.path)}
    return {"state": "done"}


def launch_torchrun(cell, job: Path) -> dict[int, str]:
    """torchrun --nproc_per_node N, in-process: --standalone on one node, else --nnodes M with the
    c10d rendezvous at `cell.node.endpoint`, hosted by node 0. Returns {rank: how it died} for ranks
    the launcher reported failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig

    t = cell.cfg.train
    if t.nnodes > 1:  # the same rendezvous name on every node, one per cell
        say(rendezvous_line(cell))
        run_id = f"{cell.node.run_id}-{cell.label}".replace("/", "-")  # torchelastic names a log folder with it
        rdzv = {"run_id": run_id, "rdzv_endpoint": cell.node.endpoint,
                "rdzv_configs": {"is_host": cell.node.leader, "join_timeout": t.dist_timeout}}
    else:
        rdzv = {"run_id": str(uuid.uuid4()), "rdzv_endpoint": "localhost:0"}
    config = LaunchConfig(min_nodes=t.nnodes, max_nodes=t.nnodes, nproc_per_node=t.nproc, rdzv_backend="c10d",
                          max_restarts=0, monitor_interval=0.1, **rdzv)
    try:
        launch_elastic(config, ["-m", "harness.launch", str(job / "job.pkl")], follower=not cell.node.leader,
                       timeout=t.dist_timeout)
    except ChildFailedError as exc:
        return {rank: describe_exit(failure.exitcode, failure.signal_name() if failure.exitcode < 0 else "")
                for rank, failure in exc.failures.items()}
    return {}


def launch_elastic(config, args: list[str], follower: bool, timeout: float) -> None:
    """`elastic_launch(config, python)(*args)`. A follower node can come to a cell's rendezvous before
    node 0 hosts it (node 0 still closing the cell before, or started later): it finds no store at
    the endpoint, and torchrun gives up at once. It tries again every second, up to `timeout` s, as
    long as node 0 waits for it; node 0's own failures are final."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.launcher.api import elastic_launch

    deadline = time.monotonic() + timeout
    while True:
        try:
            elastic_launch(config, sys.executable)(*args)
            return
        except RendezvousConnectionError:
            if not follower or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def rendezvous_line(cell) -> str:
    """What a node says while its cell's rendezvous waits for the other nodes (minutes, when one is late)."""
    t, node = cell.cfg.train, cell.node
    if node.leader:
        others = "node 1" if t.nnodes == 2 else f"nodes 1-{t.nnodes - 1}"
        return (f"cell {cell.label}: waiting for {others} of {t.nnodes} at {node.endpoint} (each runs the same command "
                f"with its --node-rank; up to train.dist_timeout={t.dist_timeout} s)")
    return f"cell {cell.label}: node {node.rank} of {t.nnodes} joining node 0 at {node.endpoint}"


def describe_exit(exitcode: int, signal_name: str) -> str:
    if exitcode < 0:
        return f"rank process died (killed by {signal_name}{'; out of memory?' if signal_name == 'SIGKILL' else ''})"
    return f"rank process exited with code {exitcode}"


def launch_ray(cell, job: Path) -> dict[int, str]:
    """One Ray Train `TorchTrainer` with `train.nproc` workers of `train.threads` CPUs (and one GPU
    each on cuda); Ray Train sets up the process group. Returns {-1: error} when the job failed."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cell.cfg.train
    gpu = t.device == "cuda"
    trainer = TorchTrainer(
        ray_worker, train_loop_config={"job": str(job / "job.pkl")},
        scaling_config=ScalingConfig(num_workers=t.nproc, use_gpu=gpu, resources_per_worker={"CPU": t.threads}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=t.dist_timeout),
        run_config=RunConfig(storage_path=str((job / "ray").resolve()), name="cell",
                             failure_config=FailureConfig(max_failures=0)))
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray Train raises the workers' error as its own
        return {-1: f"ray train job failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    if result.error is not None:
        return {-1: f"ray train job failed: {type(result.error).__name__}: {result.error}"}
    return {}


def ray_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: Ray set up the process group; the local rank comes from its context."""
    import ray.train

    os.environ.setdefault("LOCAL_RANK", str(ray.train.get_context().get_local_rank()))
    rank_main(Path(config["job"]), exit_on_failure=False)


def outcome(cell, job: Path, launcher_failures: dict[int, str], info: dict) -> dict:
    """The cell's status from the ranks' files and the launcher's report."""
    result = job / "result.json"
    if result.exists() and not launcher_failures:
        store.write_status(cell.path, "done", **store.read_json(result), **info)
        checkpoints.prune_checkpoints(cell.path)
        return store.read_status(cell.path)
    written = sorted((store.read_json(p) for p in job.glob("failure_rank*.json")), key=lambda f: f["time"])
    silent = {rank: why for rank, why in launcher_failures.items()
              if rank >= 0 and "SIGTERM" not in why and not (job / f"failure_rank{rank}.json").exists()}
    if silent:  # a rank that died without a word; the others' errors follow from its death
        rank, why = min(silent.items())
        fields = {"step": store.last_step(cell.path), "reason": f"rank {rank}: {why}", "rank": rank}
    elif written:
        first = written[0]
        fields = {"step": first["step"], "reason": f"rank {first['rank']}: {first['reason']}", "rank": first["rank"],
                  "traceback": first["traceback"]}
        if first.get("fatal"):
            fields["fatal"] = True
    elif launcher_failures:
        rank, why = min(launcher_failures.items())
        fields = {"step": store.last_step(cell.path), "reason": why if rank < 0 else f"rank {rank}: {why}"}
    else:
        fields = {"step": store.last_step(cell.path), "reason": "the ranks ended without a result"}
    store.write_status(cell.path, "failed", **fields, **info)
    return store.read_status(cell.path)


def rank_main(job_file: Path, exit_on_failure: bool = True) -> None:
    """One rank of a cell: train it; leave the summary (rank 0) or this rank's failure in the job folder."""
    import torch
    import torch.distributed as dist

    from harness import distributed
    from harness.sharded import ShardedTrainer

    with open(job_file, "rb") as fh:
        job = pickle.load(fh)
    cell, folder = job["cell"], Path(job["results"])
    t = cell.cfg.train
    device = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    trainer, world = None, distributed.World()
    try:
        world = distributed.init(device, t.dist_timeout)
        (folder / f"rank{world.rank}.pid").write_text(str(os.getpid()))
        trainer = ShardedTrainer(cell.cfg, cell.path, cache_dir=job["cache_dir"], progress=job["progress"])
        summary = trainer.run(ckpt_every=job["ckpt_every"])
        distributed.barrier(world)
        if world.main:
            store.atomic_write_json(folder / "result.json", summary)
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which fails the cell
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, HarnessError) else str(exc)
        if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
            reason = f"out of memory: {reason}"
        store.atomic_write_json(folder / f"failure_rank{world.rank}.json", {
            "rank": world.rank, "step": trainer.step if trainer else 0, "reason": reason, "time": time.time(),
            "traceback": traceback.format_exc(), "fatal": isinstance(exc, HarnessError)})
        print(f"harness: rank {world.rank} failed: {reason}", file=sys.stderr, flush=True)
        if exit_on_failure:
            os._exit(1)  # at once: no rank waits on this one's collectives; the launcher stops the others
        raise
    if exit_on_failure and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
