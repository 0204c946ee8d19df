"""``moesae doctor``: the preflight of the profile in params.yaml, in seconds, before any stage runs.

Everything that would stop a run hours in is checked at once, each problem listed with its fix:

* **models and datasets** of the profile (the pretrained subject model; the corpus datasets):
  available locally (a folder, the local HF cache, or already read into ``data/corpus``), or, when
  online, on the Hub. Script-based datasets are reported with the source the corpus stage will use
  (the Hub's parquet conversion); **gated** datasets (HLE) are checked for access with your token,
  naming the page whose terms to accept and ``HF_TOKEN``. Offline (``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE``, or the profile's ``offline: true``) nothing touches the network: every
  model or dataset missing locally is a problem.
* **disk**: the planned size of everything the run writes (activation cache, capped by
  ``activations.max_disk_gb``; corpus; subject model; every SAE; the largest transient files)
  against the free space;
* **GPU**: CUDA availability where a stage asks for it, and the GPU memory the largest family of
  SAEs trained together needs;
* **run time** per stage, estimated from the benchmark numbers in ``benchmarks/results/*.json``
  (``make benchmark``; ``make gpu-check`` on a GPU).

Network calls run concurrently in daemon threads under one deadline (``--timeout``), so the
doctor never hangs on an unreachable Hub. Exit status 1 when any problem would stop the run.
``--download`` then fetches the pretrained subject model into the HF cache (the subject-model
stage reads only the cache). As the pipeline's first stage it writes ``results/doctor.json`` (the
report) and, on success, ``results/doctor.ok`` (constant content: the corpus stage depends on it
without rerunning when the report's numbers change).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .corpus import hub_cache_dir
from .io import atomic_write_json, atomic_write_text
from .params import load_params

REPORT_FILE = Path("results/doctor.json")
STAMP_FILE = Path("results/doctor.ok")
STAMP_TEXT = "moesae doctor: preflight passed\n"
BENCH_DIR = Path("benchmarks/results")
GB = 1e9
BYTES_PER_TOKEN = 4.0
"""Text bytes per token, for planning splits whose token count is not set (GPT-2 on English ≈ 4.4)."""
MODEL_FILES = ("config.json", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
DEVICE_SECTIONS = ("subject_model", "activations", "train", "evaluate")


@dataclass
class Check:
    """One finding: ``ok``, ``note`` (worth knowing, does not stop the run) or ``problem``."""

    what: str
    status: str
    message: str
    fix: str = ""


@dataclass
class Report:
    profile: str
    offline: bool
    offline_reason: str
    checks: list[Check] = field(default_factory=list)
    disk: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    times: list[dict[str, Any]] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == "problem"]

    def add(self, what: str, status: str, message: str, fix: str = "") -> Check:
        check = Check(what, status, message, fix)
        self.checks.append(check)
        return check


# ---- offline mode ---------------------------------------------------------------------------------
def offline_mode(params: dict[str, Any]) -> tuple[bool, str]:
    """(offline?, why). Variables set in the environment win; else the profile's ``offline`` key."""
    for var in OFFLINE_VARS[:2]:
        value = os.environ.get(var)
        if value is not None and value.strip():
            on = value.strip().lower() in _TRUE
            return on, f"{var}={value} in the environment"
    if params.get("offline") is True:
        return True, "the profile's `offline: true`"
    return False, "no offline variable set" + (" (profile `offline: false`)" if "offline" in params else "")


def apply_offline(params: dict[str, Any]) -> bool:
    """Set the HF offline variables (where unset) when the profile says ``offline: true``, before
    any HF library is imported; returns whether this process is offline."""
    offline, _ = offline_mode(params)
    if offline:
        for var in OFFLINE_VARS:
            os.environ.setdefault(var, "1")
    return offline


# ---- running network checks concurrently, under one deadline ------------------------------------------
class Deadline:
    """Runs callables in daemon threads; :meth:`wait` returns once all finished or time ran out.

    A thread still blocked at the deadline is abandoned (daemon: it never delays the exit)."""

    def __init__(self) -> None:
        self._jobs: list[tuple[str, threading.Thread, dict[str, Any]]] = []

    def submit(self, name: str, fn: Callable[[], Any]) -> None:
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # reported by the caller
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"doctor:{name}", daemon=True)
        thread.start()
        self._jobs.append((name, thread, box))

    def wait(self, timeout: float) -> dict[str, dict[str, Any]]:
        end = time.monotonic() + timeout
        out = {}
        for name, thread, box in self._jobs:
            thread.join(max(0.0, end - time.monotonic()))
            out[name] = dict(box) if not thread.is_alive() else {"timeout": True}
        return out


def _error_kind(exc: BaseException) -> str:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "GatedRepoError" in names:
        return "gated"
    if "RepositoryNotFoundError" in names:
        return "missing"
    if "RevisionNotFoundError" in names:
        return "revision"
    return "network"


# ---- models ---------------------------------------------------------------------------------------
def _download_command(name: str) -> str:
    return f"hf download {name} {' '.join(MODEL_FILES)} model.safetensors"


def cached_model_files(name: str) -> dict[str, str | None]:
    """Local HF cache paths of the files the subject-model stage reads (None when absent)."""
    from huggingface_hub import try_to_load_from_cache

    out: dict[str, str | None] = {}
    for filename in MODEL_FILES + WEIGHT_FILES:
        found = try_to_load_from_cache(name, filename, cache_dir=str(hub_cache_dir()))
        out[filename] = found if isinstance(found, str) else None
    return out


def _model_cached(name: str) -> bool:
    files = cached_model_files(name)
    return all(files[f] for f in MODEL_FILES) and any(files[f] for f in WEIGHT_FILES)


def check_model(report: Report, name: str, deadline: Deadline, timeout: float, download: bool) -> Callable[[dict], None] | None:
    """Check the pretrained subject model; returns a callback for the network result, if any."""
    what = f"model {name}"
    local = Path(name)
    if local.is_dir():
        missing = [f for f in MODEL_FILES if not (local / f).is_file()]
        if not any((local / f).is_file() for f in WEIGHT_FILES):
            missing.append("model.safetensors")
        if missing:
            report.add(what, "problem", f"the folder {local} lacks {', '.join(missing)}",
                       "save the model there with save_pretrained() plus its tokenizer.json")
        else:
            report.add(what, "ok", f"local folder {local}")
        return None
    if _model_cached(name):
        report.add(what, "ok", f"in the local HF cache ({hub_cache_dir()})")
        return None
    if report.offline:
        report.add(what, "problem",
                   f"not in the local HF cache ({hub_cache_dir()}), and offline mode is on ({report.offline_reason})",
                   f"with network access: `{_download_command(name)}` (or `moesae doctor --download`) into this "
                   "HF cache; or point HF_HOME at a copy of a cache that has it; or unset the offline variables "
                   "(the paper profile sets `offline: false`); or use `moesae profile default`")
        return None
    from huggingface_hub import HfApi

    deadline.submit(what, lambda: HfApi().model_info(name, timeout=timeout))

    def done(result: dict) -> None:
        if "value" in result:
            if download:
                report.add(what, "ok", "on the Hub, not yet in the local HF cache: downloading it after the checks")
                report.downloads.append(name)
            else:
                report.add(what, "note", "on the Hub, not yet in the local HF cache (the subject-model stage "
                           "reads only the cache)", f"the pipeline's doctor stage downloads it; by hand: "
                           f"`moesae doctor --download` or `{_download_command(name)}`")
            return
        _network_problem(report, what, result, f"https://huggingface.co/{name}", gated_fix=_token_fix(f"https://huggingface.co/{name}"))

    return done


def _token_fix(page: str) -> str:
    return (f"accept the terms on {page} (logged in to huggingface.co), then give this machine your token: "
            "`hf auth login` (or `huggingface-cli login`), or export HF_TOKEN=hf_...")


def _network_problem(report: Report, what: str, result: dict, page: str, gated_fix: str) -> None:
    if result.get("timeout"):
        report.add(what, "problem", "the Hub did not answer within the doctor's deadline",
                   "check the network / proxy (HTTPS_PROXY, HF_ENDPOINT) and rerun; offline, use a populated HF "
                   "cache with HF_HUB_OFFLINE=1, or `moesae profile default`")
        return
    exc = result["error"]
    kind = _error_kind(exc)
    if kind == "gated":
        report.add(what, "problem", f"gated, and this machine has no access ({type(exc).__name__})", gated_fix)
    elif kind == "missing":
        report.add(what, "problem", f"not found on the Hub ({page}), or private", "check the name in params.yaml; "
                   "for a private repository, log in (`hf auth login` or HF_TOKEN)")
    else:
        report.add(what, "problem", f"the Hub could not be reached: {type(exc).__name__}: {exc}",
                   "check the network / proxy (HTTPS_PROXY, HF_ENDPOINT); offline, use a populated HF cache "
                   "with HF_HUB_OFFLINE=1, or `moesae profile default`")


# ---- datasets -------------------------------------------------------------------------------------
@dataclass
class DatasetNeed:
    role: str
    name: str
    config: str | None
    split: str
    data_files: Any = None


def dataset_needs(corpus: dict[str, Any]) -> list[DatasetNeed]:
    if corpus.get("source", "stdlib") != "hf":
        return []
    out = []
    for role, default_split in (("train", "train"), ("cross", "test"), ("autointerp", "train")):
        name = corpus.get(f"{role}_dataset")
        if name:
            out.append(DatasetNeed(role, str(name), corpus.get(f"{role}_config"), corpus.get(f"{role}_split", default_split),
                                   corpus.get(f"{role}_data_files")))
    return out


def _corpus_up_to_date(params: dict[str, Any]) -> bool:
    """True when ``data/corpus`` was built from exactly this corpus section (no dataset is read again)."""
    from dataclasses import asdict as _asdict

    from .corpus import MANIFEST, CorpusConfig
    from .params import section_to

    root = Path((params.get("paths") or {}).get("corpus", "data/corpus"))
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        cfg = section_to(CorpusConfig, params.get("corpus"), "corpus")
    except (OSError, ValueError):
        return False
    return manifest.get("config") == json.loads(json.dumps(_asdict(cfg)))


def check_dataset(report: Report, need: DatasetNeed, deadline: Deadline, timeout: float) -> Callable[[dict], None] | None:
    from .corpus import CONVERSION_REVISION, cached_dataset_source, has_loading_script

    what = f"dataset {need.name} ({need.role})"
    page = f"https://huggingface.co/datasets/{need.name}"
    if need.data_files:
        files = [need.data_files] if isinstance(need.data_files, str) else list(need.data_files)
        missing = [f for f in files if "://" not in f and not Path(f).exists()]
        if missing:
            report.add(what, "problem", f"data file {missing[0]} does not exist",
                       f"fix corpus.{need.role}_data_files in the profile")
        else:
            report.add(what, "ok", f"{len(files)} explicit data file(s) (corpus.{need.role}_data_files)")
        return None
    local = Path(need.name)
    if local.is_dir():
        if has_loading_script(p.name for p in local.iterdir() if p.is_file()):
            if (local / CONVERSION_REVISION).is_dir():
                report.add(what, "ok", f"local folder with a loading script: its parquet conversion "
                           f"({local / CONVERSION_REVISION}) will be read")
            else:
                report.add(what, "problem", f"{local} holds a loading script, which `datasets` >= 4 no longer runs, "
                           "and no parquet conversion", f"put the parquet files under {local / CONVERSION_REVISION}"
                           f"/<config>/<split>/, or list them in corpus.{need.role}_data_files")
        else:
            report.add(what, "ok", f"local folder {local}")
        return None
    if report.offline:
        cached = cached_dataset_source(need.name)
        if cached:
            report.add(what, "ok", f"offline; read from {cached}")
        else:
            report.add(what, "problem",
                       f"not in the local HF cache ({hub_cache_dir()}), and offline mode is on ({report.offline_reason})",
                       "run the corpus stage once with network access (the offline variables unset; the paper profile "
                       f"sets `offline: false`), or fetch it: `hf download {need.name} --repo-type dataset"
                       + (f" --revision {CONVERSION_REVISION}" if need.role == "train" else "")
                       + "`; or list local copies in corpus."
                       f"{need.role}_data_files; or use `moesae profile default`")
        return None
    from huggingface_hub import HfApi, get_token

    def probe() -> dict[str, Any]:
        api = HfApi()
        info = api.dataset_info(need.name, timeout=timeout)
        out: dict[str, Any] = {"gated": info.gated, "files": [s.rfilename for s in (info.siblings or [])]}
        if out["gated"]:
            token = get_token()
            out["token"] = bool(token)
            if token:
                try:
                    api.auth_check(need.name, repo_type="dataset")
                    out["access"] = True
                except Exception as exc:  # GatedRepoError: the terms are not accepted for this token
                    out["access"] = False
                    out["access_error"] = f"{type(exc).__name__}"
        if has_loading_script(out["files"]):
            refs = api.list_repo_refs(need.name, repo_type="dataset")
            out["converts"] = [ref.name for ref in getattr(refs, "converts", [])]
        return out

    deadline.submit(what, probe)

    def done(result: dict) -> None:
        if "value" not in result:
            _network_problem(report, what, result, page, gated_fix=_token_fix(page))
            return
        info = result["value"]
        if info["gated"]:
            if not info.get("token"):
                report.add(what, "problem", "a gated dataset, and no HF token is set on this machine", _token_fix(page))
                return
            if not info.get("access"):
                report.add(what, "problem", f"a gated dataset your token cannot read yet ({info.get('access_error')})",
                           _token_fix(page))
                return
        gated = " (gated; your token has access)" if info["gated"] else ""
        if "converts" in info:
            if "parquet" in info["converts"]:
                report.add(what, "ok", f"on the Hub{gated}; script-based, so the corpus stage reads the Hub's parquet "
                           f"conversion ({CONVERSION_REVISION})")
            else:
                report.add(what, "problem", f"on the Hub{gated}, script-based (which `datasets` >= 4 no longer runs) "
                           "and without a parquet conversion", f"point corpus.{need.role}_dataset at a parquet copy, or "
                           f"list data files in corpus.{need.role}_data_files")
            return
        report.add(what, "ok", f"on the Hub{gated}")

    return done


# ---- what the run writes: disk ---------------------------------------------------------------------
def _pretrained_config(params: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The pretrained subject model's config.json (a local folder or the local HF cache), if any."""
    name = str((params.get("subject_model") or {}).get("name", "gpt2"))
    candidates = [Path(name) / "config.json"]
    if not Path(name).is_dir():
        try:
            found = cached_model_files(name).get("config.json")
        except Exception:  # no readable HF cache: fall back to the caller's default
            found = None
        if found:
            candidates.append(Path(found))
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text()), str(path)
    return None, ""


def subject_d_model(params: dict[str, Any]) -> tuple[int, str]:
    """The subject model's width, and where it was read from."""
    sm = params.get("subject_model") or {}
    if sm.get("source", "train") == "train":
        return int(sm.get("d_model", 64)), "subject_model.d_model"
    config, where = _pretrained_config(params)
    if config and (config.get("n_embd") or config.get("hidden_size")):
        return int(config.get("n_embd") or config.get("hidden_size")), where
    M = int((params.get("grid") or {}).get("num_latents", 24576))
    return M // 32, "grid.num_latents / 32 (the model's config is not available locally)"


def _param_counts(params: dict[str, Any], d_model: int) -> dict[str, dict[str, Any]]:
    """Per variant: family, parameter count and width (built on the meta device: no memory)."""
    import torch

    from .grid import build_variant, study_variants

    out, counted = {}, {}
    with torch.device("meta"):
        for name, variant in study_variants(params).items():
            config = {k: v for k, v in variant.items() if k != "train"}
            key = json.dumps({k: v for k, v in config.items() if k not in ("k", "seed", "family")}, sort_keys=True)
            if key not in counted:  # k and the seed do not change the parameter count
                counted[key] = sum(p.numel() for p in build_variant(config, d_model).parameters())
            out[name] = {"family": variant["family"], "params": counted[key],
                         "num_latents": int(variant["num_latents"]), "variant": variant}
    return out


def _dir_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def plan_disk(params: dict[str, Any], d_model: int, sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Planned bytes of everything the run writes, the activation cache split by split."""
    from .activations import ActivationsConfig, disk_bytes, planned_epochs, train_budget
    from .params import section_to

    acts = section_to(ActivationsConfig, params.get("activations"), "activations")
    corpus = params.get("corpus") or {}
    paths = params.get("paths") or {}
    corpus_root = Path(paths.get("corpus", "data/corpus"))
    try:
        built = json.loads((corpus_root / "manifest.json").read_text())["splits"]
    except (OSError, ValueError, KeyError):
        built = {}
    heldout_fraction = float(corpus.get("heldout_fraction", 0.1))
    train_bytes = int(corpus.get("max_train_bytes", 0))
    split_bytes = {
        "train": train_bytes,
        "heldout": train_bytes * heldout_fraction / (1 - heldout_fraction),
        "cross": int(corpus.get("max_cross_bytes", 0)),
        "autointerp": int(corpus.get("max_autointerp_bytes", 0)) if corpus.get("source") == "hf" else 0,
    }
    split_bytes = {s: float(built[s]["bytes"]) if s in built else b for s, b in split_bytes.items()}
    tokens: dict[str, int] = {}
    estimated: list[str] = []
    for split, requested in acts.max_tokens.items():
        available = int(split_bytes.get(split, 0) / BYTES_PER_TOKEN)
        if split == "autointerp" and corpus.get("source") != "hf":
            available = int(split_bytes["heldout"] / BYTES_PER_TOKEN)  # stdlib: autointerp = heldout
        if requested is None:
            tokens[split] = available
            estimated.append(split)
        else:
            tokens[split] = requested
    budget = train_budget(acts, d_model, {s: n for s, n in tokens.items() if s != "train"})
    if budget is not None:
        tokens["train"] = budget["train_max_tokens"]
    train = params.get("train") or {}
    trained = int(train.get("steps", 0)) * int(train.get("batch_size", 0))
    cache = {s: disk_bytes(n, d_model, acts.dtype) for s, n in tokens.items()}
    families: dict[str, int] = {}
    for v in sizes.values():
        families[v["family"]] = families.get(v["family"], 0) + v["params"]
    sm = params.get("subject_model") or {}
    pretrained = sm.get("source", "train") == "pretrained"
    if pretrained:  # its config when available, else GPT-2 small's
        config = _pretrained_config(params)[0] or {}
        n_layers, vocab = int(config.get("n_layer", 12)), int(config.get("vocab_size", 50257))
        positions = int(config.get("n_positions", 1024))
    else:
        n_layers, vocab = int(sm.get("n_layers", 4)), int(sm.get("vocab_size", 4096))
        positions = int(sm.get("context_length", 128))
    lm_params = 12 * n_layers * d_model ** 2 + (vocab + positions) * d_model
    items = {
        "activation cache": sum(cache.values()),
        "corpus": int(sum(split_bytes.values()) * 1.05),
        "subject model": lm_params * 4 * (2 if pretrained and not Path(str(sm.get("name", ""))).is_dir() else 1),
        "SAE weights": sum(v["params"] for v in sizes.values()) * 4,
    }
    transient = {
        "checkpoints of one family": max(families.values(), default=0) * 12,  # weights + Adam's two moments
        "one activation shard being written": disk_bytes(acts.shard_tokens, d_model, acts.dtype),
    }
    total = sum(items.values()) + max(transient.values(), default=0)
    where = Path(paths.get("activations", "data/activations"))
    existing = sum(_dir_bytes(Path(p)) for p in (paths.get("activations", "data/activations"),
                                                 paths.get("corpus", "data/corpus"),
                                                 paths.get("subject_model", "models/subject"), "models"))
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe if probe.exists() else Path.cwd()).free
    return {
        "d_model": d_model, "dtype": acts.dtype, "max_disk_gb": acts.max_disk_gb,
        "cache_tokens": tokens, "cache_bytes": cache, "estimated_splits": estimated,
        "budget": budget, "train_tokens_trained": trained,
        "epochs": planned_epochs(trained, tokens.get("train", 0)) if trained and tokens.get("train") else None,
        "items": items, "transient": transient, "total_bytes": int(total),
        "existing_bytes": int(existing), "free_bytes": int(free), "disk_path": str(probe.resolve()),
    }


def check_disk(report: Report, plan: dict[str, Any]) -> None:
    need = max(0, plan["total_bytes"] - plan["existing_bytes"])
    total = plan["total_bytes"] / GB
    if need > plan["free_bytes"]:
        budget = plan["max_disk_gb"]
        report.add("disk", "problem",
                   f"the run plans {total:.1f} GB ({need / GB:.1f} GB more than is already there) but only "
                   f"{plan['free_bytes'] / GB:.1f} GB is free at {plan['disk_path']}",
                   "free disk space, lower 'activations.max_disk_gb'"
                   + (f" (now {budget:g})" if budget is not None else " (unset: the whole cache)")
                   + ", or lower 'activations.max_tokens' / the grid")
    else:
        report.add("disk", "ok", f"the run plans {total:.1f} GB; {plan['free_bytes'] / GB:.1f} GB free at {plan['disk_path']}")


# ---- GPU ----------------------------------------------------------------------------------------------
def family_gpu_bytes(sizes: dict[str, dict[str, Any]], batch_size: int, d_model: int) -> dict[str, int]:
    """Rough GPU memory per family of SAEs trained together: fp32 weights, gradients and Adam's two
    moments of every variant (16 bytes per parameter), plus one step's transient tensors of the
    widest variant (about three [batch, M] fp32 tensors and a few [batch, d] ones)."""
    out: dict[str, int] = {}
    widest: dict[str, int] = {}
    for v in sizes.values():
        out[v["family"]] = out.get(v["family"], 0) + v["params"] * 16
        widest[v["family"]] = max(widest.get(v["family"], 0), v["num_latents"])
    return {f: b + batch_size * (3 * widest[f] + 4 * d_model) * 4 for f, b in out.items()}


def _devices_asked(params: dict[str, Any]) -> dict[str, str]:
    return {s: str((params.get(s) or {}).get("device")) for s in DEVICE_SECTIONS
            if isinstance(params.get(s), dict) and "device" in params[s]}


def check_gpu(report: Report, params: dict[str, Any], sizes: dict[str, dict[str, Any]], d_model: int) -> None:
    import torch

    asked = _devices_asked(params)
    cuda = torch.cuda.is_available()
    batch = int((params.get("train") or {}).get("batch_size", 0))
    per_family = family_gpu_bytes(sizes, batch, d_model)
    family, need = max(per_family.items(), key=lambda kv: kv[1]) if per_family else ("", 0)
    report.gpu = {"cuda": cuda, "devices": asked, "largest_family": family, "largest_family_bytes": need}
    wants_cuda = sorted(s for s, d in asked.items() if d.startswith("cuda"))
    if not cuda:
        if wants_cuda:
            report.add("gpu", "problem", f"{', '.join(s + '.device' for s in wants_cuda)} asks for CUDA, but torch sees "
                       "no CUDA GPU" + ("" if torch.version.cuda else f" (this torch, {torch.__version__}, is CPU-only)"),
                       "run on a machine with an NVIDIA GPU and a CUDA build of torch, or set those devices to auto/cpu")
        elif any(d == "auto" for d in asked.values()):
            report.add("gpu", "note", "no CUDA GPU: the stages set to device auto run on the CPU "
                       f"(the largest family, {family}, needs ≈ {need / GB:.1f} GB of GPU memory on a GPU)")
        return
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    name = torch.cuda.get_device_name(index)
    report.gpu.update({"name": name, "total_bytes": int(total), "free_bytes": int(free)})
    if need > total:
        report.add("gpu", "problem", f"{name} has {total / GB:.0f} GB; training the family {family} together needs "
                   f"≈ {need / GB:.1f} GB", "lower train.batch_size or split the family's L0 values")
    elif need > free:
        report.add("gpu", "note", f"{name}: {free / GB:.0f} of {total / GB:.0f} GB free now; the largest family "
                   f"({family}) needs ≈ {need / GB:.1f} GB", "stop the other processes on the GPU before training")
    else:
        report.add("gpu", "ok", f"{name}, {total / GB:.0f} GB; the largest family ({family}) needs ≈ {need / GB:.1f} GB")
    if "device" not in (params.get("train") or {}):
        report.add("gpu", "note", "the train section has no device setting: the train stage builds the SAEs on the CPU")


# ---- run time from the benchmark numbers ---------------------------------------------------------------
def load_benchmarks(bench_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(bench_dir.glob("*.json")) if bench_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("cases"), list):
            data["_file"] = path.as_posix()
            out.append(data)
    return out


def _family_of(architecture: str) -> str:
    """Benchmark family of an architecture (presets resolved): scale, switch, or else topk."""
    from .saes.registry import resolve

    cls, _ = resolve(architecture, {})
    return cls.architecture if cls.architecture in {"scale", "switch"} else "topk"


def _flops(variant: dict[str, Any], d_model: int) -> int:
    from .grid import sae_fields
    from .saes import describe

    return describe(variant["architecture"], **{**sae_fields(variant), "d_in": d_model}).flops_per_token


def _case_family(case: dict[str, Any]) -> str:
    return {"scale": "scale", "switch": "switch"}.get(case.get("architecture"), "topk")


def variant_tokens_per_s(variant: dict[str, Any], d_model: int, cases: list[dict[str, Any]]) -> tuple[float, str] | None:
    """Training tokens/s of a variant from benchmark cases of the same width d: the exact case when
    benchmarked, else the nearest case of its kind scaled by forward FLOPs per token."""
    rows = [c for c in cases if c.get("implementation", "fast") == "fast" and c.get("config", {}).get("d_in") == d_model]
    if not rows:
        return None
    cfg = variant
    for c in rows:
        cc = c["config"]
        if c["architecture"] == variant["architecture"] and all(
                cc.get(k) == cfg.get(k) for k in ("num_latents", "num_experts", "active_experts") if k in cc):
            if variant["architecture"] == "scale" and variant.get("feature_scaling", "mean") != cc.get("feature_scaling", "mean"):
                continue
            return float(c["tokens_per_s"]), c["name"]
    try:
        kind, flops = _family_of(variant["architecture"]), _flops(variant, d_model)
    except ValueError:
        return None
    same = [c for c in rows if _case_family(c) == kind] or [c for c in rows if _case_family(c) == "topk"]
    if not same:
        return None
    ref = min(same, key=lambda c: abs(math.log(max(c["flops_per_token"], 1) / max(flops, 1))))
    return float(ref["tokens_per_s"]) * ref["flops_per_token"] / max(flops, 1), f"≈ {ref['name']} × FLOPs"


def estimate_times(params: dict[str, Any], sizes: dict[str, dict[str, Any]], plan: dict[str, Any],
                   benchmarks: list[dict[str, Any]], cuda: bool) -> list[dict[str, Any]]:
    """Estimated seconds per stage (None where no benchmark number applies), with the basis."""
    train = params.get("train") or {}
    train_device = str(train.get("device", "cpu"))
    train_kind = "cuda" if train_device.startswith("cuda") or (train_device == "auto" and cuda) else "cpu"
    stage_kind = "cuda" if cuda else "cpu"
    steps, batch = int(train.get("steps", 0)), int(train.get("batch_size", 0))
    d = plan["d_model"]

    def pick(kind: str) -> dict[str, Any] | None:
        files = [b for b in benchmarks if b.get("device_type") == kind]
        fitting = [b for b in files if any(c.get("config", {}).get("d_in") == d for c in b["cases"])]
        if not fitting:
            return None
        return min(fitting, key=lambda b: (b.get("batch_size") != batch, b["_file"]))

    bench = pick(train_kind)
    out: list[dict[str, Any]] = []
    families: dict[str, list[dict[str, Any]]] = {}
    for v in sizes.values():
        families.setdefault(v["family"], []).append(v)
    for family, members in families.items():
        row: dict[str, Any] = {"stage": f"train@{family}", "variants": len(members), "device": train_kind}
        if bench is None:
            row.update(seconds=None, basis=f"no {train_kind} benchmark at d = {d} in {BENCH_DIR}"
                       + (" (run `make gpu-check`)" if train_kind == "cuda" else " (run `make benchmark`)"))
        else:
            seconds, bases = 0.0, set()
            for v in members:
                rate = variant_tokens_per_s(v["variant"], d, bench["cases"])
                if rate is None:
                    seconds = math.nan
                    break
                seconds += steps * batch / rate[0]
                bases.add(rate[1])
            row.update(seconds=None if math.isnan(seconds) else seconds,
                       basis=f"{Path(bench['_file']).name}: {', '.join(sorted(bases))}")
        out.append(row)
    pipeline = next((b["pipeline"] for b in benchmarks if b.get("device_type") == stage_kind
                     and isinstance(b.get("pipeline"), dict) and b["pipeline"].get("d_model") == d), None)
    cache_tokens = sum(plan["cache_tokens"].values())
    if pipeline and pipeline.get("activations_tokens_per_s"):
        out.insert(0, {"stage": "activations", "seconds": cache_tokens / pipeline["activations_tokens_per_s"],
                       "basis": f"{pipeline['activations_tokens_per_s']:,.0f} tokens/s measured by gpu-check", "device": stage_kind})
    else:
        out.insert(0, {"stage": "activations", "seconds": None, "device": stage_kind,
                       "basis": "no measurement at this width (`make gpu-check` measures it on a GPU)"})
    if pipeline and pipeline.get("evaluate_seconds_per_variant"):
        ev = params.get("evaluate") or {}
        scale = (ev.get("max_tokens") or cache_tokens) / max(pipeline.get("evaluate_max_tokens") or 1, 1)
        per = pipeline["evaluate_seconds_per_variant"] * max(scale, 1.0)
        out.append({"stage": "evaluate (all families)", "seconds": per * len(sizes), "device": stage_kind,
                    "basis": f"{pipeline['evaluate_seconds_per_variant']:.1f} s per variant measured by gpu-check, "
                             f"scaled by evaluate.max_tokens"})
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# ---- the whole preflight --------------------------------------------------------------------------------
def run_doctor(params: dict[str, Any], *, timeout: float = 10.0, download: bool = False,
               bench_dir: str | Path = BENCH_DIR) -> Report:
    t0 = time.perf_counter()
    offline, why = offline_mode(params)
    report = Report(profile=str(params.get("profile", "?")), offline=offline, offline_reason=why)
    deadline = Deadline()
    callbacks: list[tuple[str, Callable[[dict], None]]] = []
    sm = params.get("subject_model") or {}
    if sm.get("source", "train") == "pretrained":
        cb = check_model(report, str(sm.get("name", "gpt2")), deadline, timeout, download)
        if cb:
            callbacks.append((f"model {sm.get('name', 'gpt2')}", cb))
    needs = dataset_needs(params.get("corpus") or {})
    if needs and _corpus_up_to_date(params):
        corpus_dir = (params.get("paths") or {}).get("corpus", "data/corpus")
        report.add("datasets", "ok", f"the corpus was already read with this profile's corpus section ({corpus_dir}); "
                   "no dataset is read again")
        needs = []
    for need in needs:
        cb = check_dataset(report, need, deadline, timeout)
        if cb:
            callbacks.append((f"dataset {need.name} ({need.role})", cb))
    # Local checks while the network ones run.
    d_model, d_source = subject_d_model(params)
    try:
        sizes = _param_counts(params, d_model)
    except ValueError as exc:
        report.add("grid", "problem", str(exc), "fix the grid in params.yaml")
        sizes = {}
    try:
        report.disk = plan_disk(params, d_model, sizes)
        report.disk["d_model_source"] = d_source
        check_disk(report, report.disk)
    except ValueError as exc:
        guessed = [s for s, n in ((params.get("activations") or {}).get("max_tokens") or {}).items() if n is None and s != "train"]
        report.add("disk", "problem", str(exc) + (
            f" (the token count of {', '.join(guessed)} is estimated from the corpus byte budgets at "
            f"{BYTES_PER_TOKEN:g} bytes a token, an upper bound)" if guessed else ""),
            "see docs/paper_profile.md#disk" + (f"; bound it with activations.max_tokens.{guessed[0]}" if guessed else ""))
    check_gpu(report, params, sizes, d_model)
    results = deadline.wait(timeout)
    for name, cb in callbacks:
        cb(results.get(name, {"timeout": True}))
    if report.disk:
        report.times = estimate_times(params, sizes, report.disk, load_benchmarks(Path(bench_dir)), report.gpu.get("cuda", False))
    report.seconds = time.perf_counter() - t0
    return report


def download_models(report: Report, timeout: float) -> None:
    """Fetch the models the checks found on the Hub but not in the cache (config, tokenizer, weights)."""
    from huggingface_hub import hf_hub_download

    for name in report.downloads:
        for filename in MODEL_FILES + ("model.safetensors", "generation_config.json"):
            print(f"[doctor] downloading {name}/{filename}", flush=True)
            try:
                hf_hub_download(name, filename, cache_dir=str(hub_cache_dir()), etag_timeout=timeout)
            except Exception as exc:
                if filename == "generation_config.json" and "EntryNotFound" in type(exc).__name__:
                    continue  # optional
                raise RuntimeError(f"downloading {name}/{filename} failed: {type(exc).__name__}: {exc}; "
                                   f"retry, or fetch it by hand: `{_download_command(name)}`") from exc


def format_report(report: Report) -> str:
    mode = f"offline: {report.offline_reason}" if report.offline else f"online ({report.offline_reason})"
    lines = [f"moesae doctor: profile {report.profile}, {mode}"]
    tag = {"ok": "ok     ", "note": "note   ", "problem": "PROBLEM"}
    for c in report.checks:
        lines.append(f"  {tag[c.status]}  {c.what}: {c.message}")
        if c.fix:
            lines.append(f"           fix: {c.fix}")
    disk = report.disk
    if disk:
        budget = disk["max_disk_gb"]
        lines.append(f"disk plan (d_model {disk['d_model']}, {disk['dtype']} cache; activations.max_disk_gb "
                     f"{'unset' if budget is None else f'{budget:g} GB'}):")
        for split, n in disk["cache_tokens"].items():
            extra = " (estimated from the corpus bytes)" if split in disk["estimated_splits"] else ""
            b = disk.get("budget")
            if split == "train" and b:
                want = "the whole split" if b["requested_tokens"] is None else f"{b['requested_tokens']:,}"
                extra = f" (capped by the budget from {want})" if b["capped"] else ""
                if disk.get("epochs"):
                    extra += f"; train.steps × batch_size = {disk['train_tokens_trained']:,} tokens = {disk['epochs']:.1f} epochs"
            lines.append(f"  activations/{split:<11} {n:>12,} tokens {disk['cache_bytes'][split] / GB:8.2f} GB{extra}")
        for item, b in disk["items"].items():
            lines.append(f"  {item:<23} {b / GB:27.2f} GB")
        worst = max(disk["transient"].items(), key=lambda kv: kv[1])
        lines.append(f"  {'largest transient':<23} {worst[1] / GB:27.2f} GB ({worst[0]})")
        lines.append(f"  planned disk use: {disk['total_bytes'] / GB:.1f} GB; free {disk['free_bytes'] / GB:.1f} GB "
                     f"at {disk['disk_path']}")
    if report.times:
        lines.append("estimated run time per stage (from benchmark numbers; I/O and start-up not included):")
        known = 0.0
        for t in report.times:
            label = t["stage"] + (f" ({t['variants']} variant{'s' if t['variants'] != 1 else ''})" if "variants" in t else "")
            lines.append(f"  {label:<40} {_duration(t['seconds']):>10}  [{t['device']}] {t['basis']}")
            known += t["seconds"] or 0.0
        lines.append(f"  {'total of the estimated stages':<40} {_duration(known):>10}")
    for name in report.downloads:
        lines.append(f"  download: {name} into {hub_cache_dir()}")
    n = len(report.problems)
    lines.append(f"{n} problem{'s' if n != 1 else ''}: the run would stop; fix {'them' if n > 1 else 'it'} and rerun "
                 "`moesae doctor`" if n else f"no problems ({report.seconds:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=str(REPORT_FILE), help="the JSON report ('' for none)")
    parser.add_argument("--stamp", default=str(STAMP_FILE), help="written (constant content) when no problem is found")
    parser.add_argument("--download", action="store_true", help="fetch the pretrained subject model into the HF cache")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for all network checks together")
    parser.add_argument("--bench-dir", default=str(BENCH_DIR))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    apply_offline(params)  # before any HF library is imported
    stamp = Path(args.stamp) if args.stamp else None
    if stamp is not None:
        stamp.unlink(missing_ok=True)
    report = run_doctor(params, timeout=args.timeout, download=args.download, bench_dir=args.bench_dir)
    print(format_report(report), flush=True)
    if args.out:
        data = asdict(report)
        data["problems"] = len(report.problems)
        atomic_write_json(args.out, data, default=str)
    if report.problems:
        return 1
    if args.download and report.downloads:
        download_models(report, args.timeout)
    if stamp is not None:
        atomic_write_text(stamp, STAMP_TEXT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
