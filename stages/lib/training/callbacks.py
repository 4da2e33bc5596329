"""Trainer callbacks of the train stage: dvclive plots at the trainer's step, and throughput timing."""

from __future__ import annotations

import time
from pathlib import Path

from stages.lib.training.results import is_run_summary, is_wall_clock


def live_callback(live_dir: Path):
    """transformers' DVCLive callback, logging at the trainer's global step (x: step in dvc.yaml) and
    replaying the restored history after a resume, so the plots are whole."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepDVCLiveCallback(DVCLiveCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            super().on_train_begin(args, state, control, model=model, **kwargs)
            self.replay(state.log_history if state.global_step > 0 else ())

        def replay(self, history):
            """Log a restored history (a resumed or an already finished run), so the plots are whole."""
            for entry in history:
                self._log_at(entry.get("step", 0), entry)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if not self._initialized:
                self.setup(args, state, model)
            if state.is_world_process_zero:
                self._log_at(state.global_step, logs or {})

        def _log_at(self, step: int, logs: dict):
            if is_run_summary(logs):
                return  # its numbers are in metrics.json
            self.live.step = step
            for key, value in logs.items():
                if (key not in ("step", "epoch") and not is_wall_clock(key) and isinstance(value, (int, float))
                        and not isinstance(value, bool)):
                    # eval/loss and train/loss side by side in `dvc plots show`
                    name = (f"eval/{key[5:]}" if key.startswith("eval_")
                            else f"train/{key[6:]}" if key.startswith("train_") else f"train/{key}")
                    self.live.log_metric(name, value)
            self.live.make_summary()

    # dvcyaml=False: dvc.yaml already declares the plots; save_dvc_exp=False: `dvc exp run` owns experiments
    return StepDVCLiveCallback(live=Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None))


WARMUP_STEPS = 2  # steps left out of the steady-state rate (kernel autotuning, allocator growth, first gathers)


def throughput_callback():
    """Times this run's training (evaluation excluded) and counts the non-pad tokens it trained on, summed over
    processes; also the steady-state rate after WARMUP_STEPS steps, which is what throughput comparisons use."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        timing: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.eval_seconds, self.mark, self.last = time.perf_counter(), 0.0, None, None
            self.step0, self.tokens0 = state.global_step, state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.eval_seconds += (logs or {}).get("eval_runtime", 0.0)

        def on_step_end(self, args, state, control, **kwargs):
            # called before that step's evaluation and checkpoint save, so neither is in the steady window
            self.last = (time.perf_counter(), self.eval_seconds, state.num_input_tokens_seen)
            if state.global_step - self.step0 == WARMUP_STEPS:
                self.mark = self.last

        def on_train_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start - self.eval_seconds
            steady = None
            if self.mark is not None and self.last is not self.mark:
                (t0, ev0, n0), (t1, ev1, n1) = self.mark, self.last
                steady = (n1 - n0) / max(t1 - t0 - (ev1 - ev0), 1e-9)
            self.timing = {"steps": state.global_step - self.step0, "seconds": seconds,
                           "tokens": state.num_input_tokens_seen - self.tokens0, "eval_seconds": self.eval_seconds,
                           "step0": self.step0, "steady_tokens_per_second": steady}

    return Throughput()
