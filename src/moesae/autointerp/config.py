"""The ``autointerp`` section of params.yaml (and its ``llm`` subsection), validated.

Every key is documented on its field below; ``docs/autointerp.md`` explains how the keys of the
``llm`` subsection are used against a real server.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..devices import check_device
from ..params import section_to

SCORERS = ("detection", "fuzzing")
BACKENDS = ("token_pattern", "openai")
EXTRA_FAMILIES = ("all_baselines", "none")
RESPONSE_FORMATS = ("none", "json_schema")
EXPLANATION_STOP = ["Example ", "Active tokens:"]
"""Where an explanation reply is cut: the explainer prompt's own scaffolding, so a model that runs
on into a fake ``Example 21:`` stops there (and its reply is then seen to hold no explanation)."""
FIG3D_FAMILIES = [
    "scale_n16_e2", "scale_n32_e4", "scale_n64_e8_mean", "switch_n32", "scale_n64_e1_plain",
    "topk_m32th", "topk_m8th",
]
"""The Fig 3d series of the paper (grid family names)."""


@dataclass
class LLMConfig:
    """The ``openai`` backend: any OpenAI-compatible ``/chat/completions`` endpoint."""

    base_url: str | None = None
    """Endpoint root including ``/v1``; null: $MOESAE_LLM_BASE_URL, then $OPENAI_BASE_URL."""
    model: str | None = None
    """Model name as the server knows it; null: $MOESAE_LLM_MODEL."""
    api_key_env: str = "MOESAE_LLM_API_KEY"
    """Environment variable holding the API key (never put keys in params); falls back to $OPENAI_API_KEY."""
    cache_dir: str = "data/llm_cache"
    """Responses are cached here (one JSON file per request), so reruns cost nothing."""
    concurrency: int = 8
    """Features explained and scored in parallel (requests in flight)."""
    max_retries: int = 6
    """Retries on HTTP 429 / 5xx / connection errors, with exponential backoff."""
    backoff_seconds: float = 1.0
    """First backoff; doubled each retry (capped at 60 s); a Retry-After header wins."""
    timeout_seconds: float = 120.0
    temperature: float = 0.0
    examples_per_prompt: int = 10
    """Excerpts judged per scoring request."""
    explanation_max_tokens: int = 200
    judgement_max_tokens: int = 120
    explanation_stop: list[str] = field(default_factory=lambda: list(EXPLANATION_STOP))
    """Stop sequences of the explainer request (at most 4, the OpenAI limit); the reply is also cut
    at them here, for servers that echo or ignore them. ``[]``: none."""
    response_format: str = "none"
    """none | json_schema: judgement requests carry an OpenAI ``response_format`` JSON schema
    (``{"answers": [0 or 1, ...]}`` of exactly the right length), for servers with structured
    output (vLLM, OpenAI); servers without it (``transformers serve``) ignore or refuse it."""
    malformed_retries: int = 1
    """A reply that holds no readable answer (no 0/1 list of the right length, no explanation line)
    is asked again this many times, with a stricter reminder of the format; 0: never."""
    price_per_million_input: float = 0.0
    """USD per million prompt tokens, for the cost shown on the progress bar (0: tokens only)."""
    price_per_million_output: float = 0.0

    def __post_init__(self) -> None:
        for name in ("concurrency", "examples_per_prompt", "explanation_max_tokens", "judgement_max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"'llm.{name}' must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_retries", "malformed_retries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"'llm.{name}' must be a non-negative integer, got {getattr(self, name)!r}")
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(f"'llm.response_format' must be one of {RESPONSE_FORMATS}, got {self.response_format!r}")
        stop = self.explanation_stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"'llm.explanation_stop' must be a list of at most 4 non-empty strings, got {stop!r}")
        for name in ("backoff_seconds", "timeout_seconds", "temperature", "price_per_million_input", "price_per_million_output"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"'llm.{name}' must be >= 0, got {getattr(self, name)!r}")

    def resolved(self) -> tuple[str, str, str | None]:
        """(base_url, model, api_key) from params, else the environment; errors say what to set."""
        base_url = self.base_url or os.environ.get("MOESAE_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        model = self.model or os.environ.get("MOESAE_LLM_MODEL")
        if not base_url:
            raise ValueError(
                "autointerp backend 'openai' needs an endpoint: set 'autointerp.llm.base_url' in params.yaml "
                "or MOESAE_LLM_BASE_URL (e.g. http://localhost:8000/v1 for vLLM)"
            )
        if not model:
            raise ValueError(
                "autointerp backend 'openai' needs a model: set 'autointerp.llm.model' in params.yaml "
                "or MOESAE_LLM_MODEL (e.g. meta-llama/Llama-3.1-8B-Instruct)"
            )
        key = os.environ.get(self.api_key_env) or os.environ.get("OPENAI_API_KEY")
        return base_url, model, key


@dataclass
class AutointerpConfig:
    """The ``autointerp`` section of params.yaml."""

    backend: str = "token_pattern"
    """token_pattern (offline, deterministic) | openai (an OpenAI-compatible chat endpoint, see ``llm``)."""
    split: str = "heldout"
    """Activation-cache split the examples come from (paper profile: ``autointerp`` = OpenWebText2)."""
    families: list[str] = field(default_factory=lambda: list(FIG3D_FAMILIES))
    """Grid families scored (Fig 3d series); families absent from the grid are skipped."""
    extra_families: str = "all_baselines"
    """all_baselines: also score every other grid family whose architecture is not a mixture of
    experts (``moesae.saes.describe(...).is_moe`` is false: ReLU, Gated, JumpReLU, BatchTopK, ...);
    none: score the listed ``families`` only."""
    target_l0: int = 32
    """Each family's variant with the k nearest this is scored (the paper: all at L0 = 32)."""
    num_features: int = 100
    """Random live features per SAE (paper: 1000)."""
    min_activations: int = 20
    """A feature is eligible when it fires on at least this many cached tokens (enough to explain and test)."""
    max_tokens: int | None = None
    """Cached tokens read (null: the whole split)."""
    batch_size: int = 4096
    chunk_length: int = 32
    """Contexts are non-overlapping chunks of this many tokens; one example per chunk."""
    window_before: int = 16
    """Tokens shown before the activating (peak) token."""
    window_after: int = 4
    """Tokens shown after it."""
    explainer_examples: int = 20
    """Top activating contexts shown to the explainer (at most half a feature's contexts)."""
    examples_per_decile: int = 5
    """Activating contexts scored per activation decile (and as many non-activating ones in total)."""
    max_patterns: int = 5
    """token_pattern: at most this many tokens / bigrams in an explanation."""
    min_precision: float = 0.5
    """token_pattern: a pattern must be active on at least this share of its occurrences."""
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    ci: str = "bootstrap"
    """Confidence interval: bootstrap (over features) | wilson (over judgements)."""
    ci_level: float = 0.95
    bootstrap_samples: int = 1000
    seed: int = 0
    device: str = "cpu"
    """Where the SAEs encode the cache: auto | cpu | cuda | cuda:<index> | mps."""
    min_parse_rate: float = 0.8
    """The stage fails when, for some SAE, fewer than this share of the judgements the protocol
    plans come back usable: a judgement is lost when its reply could not be parsed (even after the
    retry) or when its feature's explanation was degenerate (empty, an echo of the prompt's
    scaffolding, a repetition loop: such features are not scored). token_pattern always scores 1."""
    llm: LLMConfig | dict = field(default_factory=LLMConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"'backend' must be one of {BACKENDS}, got {self.backend!r}")
        check_device(self.device, "device")
        if self.ci not in ("bootstrap", "wilson"):
            raise ValueError(f"'ci' must be 'bootstrap' or 'wilson', got {self.ci!r}")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise ValueError(f"'scorers' must be a non-empty subset of {SCORERS}, got {self.scorers!r}")
        if not isinstance(self.families, list) or not all(isinstance(f, str) for f in self.families):
            raise ValueError(f"'families' must be a list of grid family names, got {self.families!r}")
        if self.extra_families not in EXTRA_FAMILIES:
            raise ValueError(f"'extra_families' must be one of {EXTRA_FAMILIES}, got {self.extra_families!r}")
        positive = ["target_l0", "num_features", "min_activations", "batch_size", "chunk_length",
                    "explainer_examples", "examples_per_decile", "max_patterns", "bootstrap_samples"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"'{name}' must be a positive integer, got {value!r}")
        for name in ("window_before", "window_after"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"'{name}' must be a non-negative integer, got {getattr(self, name)!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"'max_tokens' must be a positive integer or null, got {self.max_tokens!r}")
        if not 0 < self.min_precision <= 1:
            raise ValueError(f"'min_precision' must be in (0, 1], got {self.min_precision!r}")
        rate = self.min_parse_rate
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1:
            raise ValueError(f"'min_parse_rate' must be in [0, 1], got {self.min_parse_rate!r}")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"'ci_level' must be in (0, 1), got {self.ci_level!r}")
        if isinstance(self.llm, dict):
            self.llm = section_to(LLMConfig, self.llm, "autointerp.llm")
        elif not isinstance(self.llm, LLMConfig):
            raise ValueError(f"'llm' must be a mapping, got {type(self.llm).__name__}")


def load_config(section: dict | None, backend: str | None = None) -> AutointerpConfig:
    """The validated ``autointerp`` section; ``backend`` (the CLI's ``--backend``) overrides it.

    The key ``extra_architectures`` of older params files is refused with the name of its
    replacement."""
    section = dict(section or {})
    if "extra_architectures" in section:
        from ..params import ParamsError

        raise ParamsError(
            "params.yaml: 'autointerp.extra_architectures' was replaced by 'autointerp.extra_families' "
            "(all_baselines: every non-MoE grid family; none: the listed families only); "
            "regenerate params.yaml from its profile"
        )
    if backend:
        section["backend"] = backend
    return section_to(AutointerpConfig, section, "autointerp")
