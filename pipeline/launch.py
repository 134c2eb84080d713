"""The torchrun command lines that the stages run (training, the hidden-state dump)."""
from __future__ import annotations

import sys
from pathlib import Path


def torchrun_command(args: list[str], nproc_per_node: int = 1, nnodes: int = 1, rdzv_endpoint: str = "",
                     rdzv_id: str = "pipeline", module: str = "pipeline.train", log_dir: Path | None = None) -> list[str]:
    """The command that runs ``module`` (by default this entry point) under torchrun (the
    interpreter's own torch.distributed.run). With ``log_dir``, every rank's stdout and stderr
    also go to files of their own there (``<run>/attempt_0/<rank>/stdout.log``), as well as to
    the console with a ``[default<rank>]:`` prefix."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes == 1 and not rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    if log_dir is not None:
        cmd += [f"--log-dir={log_dir}", "--tee=3"]
    return cmd + ["-m", module, *args]
