"""Peak GPU memory as the card sees it, for benchmarks (no stage imports this module).

torch.cuda.max_memory_allocated counts only this process's tensors. What decides whether a run fits is the card's
"used" memory: the CUDA contexts, the caching allocators' reserve, a paged optimizer's unified memory, and every
process of a multi-GPU run. GpuMemorySampler samples it in a separate process (a polling thread in the measured
process competes for the GIL and slowed the CPU-bound benchmark rows) and writes one line per sample, in
nvidia-smi's CSV layout, to a log file that read_log summarises.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 2**20


def read_log(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(first sample, peak) of memory used in MiB per GPU index, from a sampler log (`timestamp, index, MiB` lines;
    nvidia-smi's `[N/A]` and partial lines are skipped)."""
    first: dict[str, int] = {}
    peak: dict[str, int] = {}
    if not Path(path).is_file():
        return first, peak
    for line in Path(path).read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[-1].isdigit():
            continue
        gpu, mib = parts[-2], int(parts[-1])
        first.setdefault(gpu, mib)
        peak[gpu] = max(peak.get(gpu, 0), mib)
    return first, peak


def _poll_nvml(gpus: list | None, interval_s: float, log_path: str, conn) -> None:
    """Child process: append `timestamp, gpu, MiB` for each GPU every interval_s, and once more at stop."""
    import pynvml

    try:
        pynvml.nvmlInit()
        ids = gpus if gpus is not None else list(range(pynvml.nvmlDeviceGetCount()))
        handles = {g: (pynvml.nvmlDeviceGetHandleByUUID(g) if isinstance(g, str)
                       else pynvml.nvmlDeviceGetHandleByIndex(g)) for g in ids}
    except pynvml.NVMLError:
        conn.send(False)
        return
    conn.send(True)
    with open(log_path, "a", encoding="utf-8") as out:

        def sample():
            stamp = time.strftime("%Y/%m/%d %H:%M:%S")
            for g, handle in handles.items():
                out.write(f"{stamp}, {g}, {pynvml.nvmlDeviceGetMemoryInfo(handle).used // MIB}\n")

        sample()
        while not conn.poll(interval_s):
            sample()
        sample()
    conn.recv()
    conn.send(True)


class GpuMemorySampler:
    """Memory used on the GPUs while the `with` block runs, sampled every interval_s by another process.

    gpus: GPU indices or UUIDs to watch, or None for all. NVML when the pynvml bindings are installed, else
    nvidia-smi's own loop (100 ms at the finest it allows); without either (a CPU machine) the sampler records
    nothing and says so once. log: where the samples go (a temporary file when not given).
    """

    def __init__(self, log: Path | None = None, gpus: list[int | str] | None = None, interval_s: float = 0.1):
        if log is None:
            handle, log = tempfile.mkstemp(suffix=".csv", prefix="gpu-memory-")
            os.close(handle)
        self.path = Path(log)
        self.gpus, self.interval_s = gpus, interval_s
        self.source: str | None = None
        self._proc = self._conn = None

    def __enter__(self):
        if self._start_nvml() or self._start_nvidia_smi():
            return self
        log.warning("neither NVML nor nvidia-smi can read a GPU here: GPU memory is not sampled")
        return self

    def _start_nvml(self) -> bool:
        try:
            import pynvml  # noqa: F401
        except ImportError:
            return False
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # never fork a process that holds a CUDA context
        self._conn, child = ctx.Pipe()
        proc = ctx.Process(target=_poll_nvml, args=(self.gpus, self.interval_s, str(self.path), child), daemon=True)
        try:
            proc.start()
        except (OSError, RuntimeError) as exc:
            log.warning("could not start the NVML sampler (%s)", exc)
            return False
        child.close()  # so a child that dies ends the wait below instead of its timeout
        try:
            ready = self._conn.poll(30) and self._conn.recv()
        except EOFError:
            ready = False
        if not ready:
            proc.join(5)
            return False
        self._proc, self.source = proc, "nvml"
        return True

    def _start_nvidia_smi(self) -> bool:
        cmd = ["nvidia-smi", "--query-gpu=timestamp,index,memory.used", "--format=csv,noheader,nounits",
               "-lms", str(max(int(self.interval_s * 1000), 100))]
        if self.gpus is not None:
            cmd.append(f"--id={','.join(str(i) for i in self.gpus)}")
        try:
            self._proc = subprocess.Popen(cmd, stdout=open(self.path, "a"), stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            return False
        self.source = "nvidia-smi"
        return True

    def __exit__(self, *exc):
        if self._proc is None:
            return
        if self.source == "nvml":
            self._conn.send("stop")
            self._conn.poll(30)
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.terminate()
        else:
            self._proc.terminate()
            self._proc.wait()

    def start_gib(self) -> dict[str, float]:
        """Each GPU's memory in its first sample: what other processes held before the measured work began."""
        return {gpu: round(mib / 1024, 2) for gpu, mib in sorted(read_log(self.path)[0].items())}

    def peaks_gib(self) -> dict[str, float]:
        return {gpu: round(mib / 1024, 2) for gpu, mib in sorted(read_log(self.path)[1].items())}

    def peak_bytes(self) -> int | None:
        """The highest sample over the watched GPUs, bytes; None when nothing was sampled."""
        peaks = read_log(self.path)[1]
        return max(peaks.values()) * MIB if peaks else None
