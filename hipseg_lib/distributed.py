"""Running on several processes (torchrun: NCCL on GPUs, gloo on CPUs) and compiling: what the
production trainer (:mod:`~hipseg_lib.trainer`) adds around the core's training functions.
"""
from __future__ import annotations

import datetime
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import HipsegError, first_line

__all__ = ["Launch", "Dist", "wait_for_other_ranks", "CompiledOrEager", "PROCESS_GROUP_TIMEOUT"]

# How long a process waits in a collective: long enough for rank 0 to preprocess a cold cache of the
# real set while the others wait (PyTorch's default, 10 minutes, is not).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Launch:
    """How this process was started: alone, or as one of torchrun's processes. Read once, from the
    environment torchrun sets, by the entry point (the command line, or a
    :class:`~hipseg_lib.trainer.Trainer` made in a notebook) and passed down.

    Example:
        >>> Launch.from_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
        ...                          "TORCHELASTIC_RUN_ID": "x"}).rank
        1
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False  # under torchrun, even with one process (a process group is made)
    run_id: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    restart: int = 0

    @classmethod
    def from_environment(cls, env=None) -> Launch:
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        run_id = env.get("TORCHELASTIC_RUN_ID")
        return cls(rank=int(env.get("RANK", "0")), world=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                   distributed=world > 1 or ("LOCAL_RANK" in env and run_id is not None), run_id=run_id,
                   master_addr=env.get("MASTER_ADDR"),
                   master_port=int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None,
                   restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0


class CompiledOrEager:
    """Call ``torch.compile(net)``, or ``net`` itself once compiling fails (with one warning).

    Compilation happens lazily: the first call compiles the forward pass and, inside the same guard,
    runs a backward pass through it (which compiles the backward graph), leaving no gradients behind.
    A failure of either means eager from then on. Running out of memory and CUDA errors are not
    compilation failures: they are raised. ``agree`` (e.g. ``Dist.min_int``) makes every process take
    the same road: if compiling failed on one, all run eager.
    """

    def __init__(self, net: torch.nn.Module, enabled: bool = True, agree=None):
        self.net = net
        self.compiled = None
        self.agree = agree
        self.warmed = False
        if enabled:
            try:
                self.compiled = torch.compile(net)
            except Exception as exc:
                warnings.warn(f"torch.compile unavailable ({first_line(exc, 200)}); running eager", stacklevel=2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None and not self.warmed:
            self._warm_up(x)
        if self.compiled is not None:
            return self.compiled(x)
        return self.net(x)

    def _warm_up(self, x: torch.Tensor) -> None:
        assert self.compiled is not None
        ok = True
        # the warm-up's dropout draws are put back: a compiled run draws what an eager one does
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                out = self.compiled(x)
                if out.requires_grad:
                    out.float().sum().backward()
            except (torch.OutOfMemoryError, torch.AcceleratorError, KeyboardInterrupt):
                raise  # the device's failures, not the compiler's
            except Exception as exc:
                warnings.warn(f"torch.compile failed ({first_line(exc, 200)}); running eager", stacklevel=3)
                ok = False
            finally:
                for p in self.net.parameters():
                    p.grad = None
        if self.agree is not None:
            ok = bool(self.agree(int(ok)))
        if not ok:
            self.compiled = None
        self.warmed = True


class Dist:
    """Process-group helpers for torchrun (NCCL on GPUs, gloo on CPUs); a no-op in one process."""

    def __init__(self, device_pref: str, launch: Launch | None = None):
        launch = launch or Launch()
        # Under torchrun, even with one process, a process group is made: a one-GPU torchrun run
        # initialises NCCL exactly as a multi-GPU one does.
        self.enabled = launch.distributed
        if self.enabled and not dist.is_initialized():
            cuda = torch.cuda.is_available() and device_pref != "cpu"
            if cuda:
                torch.cuda.set_device(launch.local_rank)
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
            self.owns_group = True
        else:
            self.owns_group = False
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        self.backend = dist.get_backend() if self.enabled else "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value`` (so that all ranks take the same decision)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device() or "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def main_first(self, fn, then_others: bool = True):
        """Run ``fn`` on rank 0, then (``then_others``) on the other ranks: e.g. fill a cache once.

        A ``HipsegError`` on rank 0 is passed to every rank, so that each ends with the same one
        line instead of waiting in a collective that rank 0 never reaches.
        """
        if not self.enabled:
            return fn()
        if self.main:
            try:
                out = fn()
            except HipsegError as exc:
                dist.broadcast_object_list([str(exc)], src=0, device=self._device())
                raise
            dist.broadcast_object_list([None], src=0, device=self._device())
            return out
        message = [None]
        dist.broadcast_object_list(message, src=0, device=self._device())
        if message[0] is not None:
            raise HipsegError(message[0])
        return fn() if then_others else None

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def wait_for_other_ranks(launch: Launch, timeout: float = 20.0) -> None:
    """Under torchrun, wait (at most ``timeout`` seconds) until every process has got here.

    torchrun stops all processes as soon as one exits, so a process that ends first with an error
    would cut the others off before they print their line. The command line calls this after
    printing an error. It uses torchrun's own key-value store, so it works with any backend and
    after the process group has ended; outside torchrun, or if the store cannot be reached, it
    returns at once.
    """
    if launch.world < 2 or not launch.run_id or not launch.master_addr or launch.master_port is None:
        return
    key = f"hipseg/{launch.run_id}/{launch.restart}/ended"
    deadline = time.monotonic() + timeout
    try:
        store = dist.TCPStore(launch.master_addr, launch.master_port, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        store.add(key, 1)
        while store.add(key, 0) < launch.world and time.monotonic() < deadline:
            time.sleep(0.02)
    except (RuntimeError, OSError, dist.DistStoreError):  # the line is out already; waiting is a courtesy
        return
