"""What the backend did for each SAE (requests, degenerate explanations, unreadable replies,
judgements used), and the gate that fails the stage when too few judgements are usable.

A judgement is *planned* for every scoring item of every sampled feature; it is *used* when its
feature's explanation is not degenerate and its reply was parsed. ``parse_rate = used / planned``
(see docs/autointerp.md, "What the counts mean").
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .scoring import FeatureResult

FAIL_FAST_FEATURES = 10
"""After this many features of an SAE, a parse rate below half the threshold stops the run."""
SHOW_REPLY_CHARS = 600


class AutointerpFailure(RuntimeError):
    """The LLM's replies are not usable: the message names the endpoint and model, gives the
    counts and one raw reply, and says what to check."""

    def __init__(self, message: str, counts: list[SAECounts]):
        super().__init__(message)
        self.counts = counts


@dataclass
class SAECounts:
    """Per SAE: what was asked, what came back, what was used (the fields of summary.json)."""

    variant: str
    family: str = ""
    num_latents: int = 0
    live_features: int = 0
    """Features firing at least once on the cached tokens read."""
    features_sampled: int = 0
    features_scored: int = 0
    """Sampled features with at least one used judgement."""
    requests: int = 0
    """HTTP requests sent for this SAE (HTTP retries included; cache hits not)."""
    cache_hits: int = 0
    http_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    explanations: int = 0
    explanations_degenerate: int = 0
    """Explanations still degenerate after the retry (their features are not scored)."""
    explanations_retried: int = 0
    degenerate_reasons: dict[str, int] = field(default_factory=dict)
    """empty | scaffolding | repetition | truncated → how many."""
    judgement_prompts: int = 0
    """Scoring requests (one per batch of excerpts; retries not counted)."""
    replies_unparsed: int = 0
    """Judgement replies that could not be parsed at the first attempt."""
    replies_recovered: int = 0
    """Of those, how many the retry with the stricter reminder recovered."""
    prompts_lost: int = 0
    """Scoring requests with no readable reply even after the retry."""
    judgements_planned: int = 0
    judgements_requested: int = 0
    """Planned judgements actually sent (those of features with a usable explanation)."""
    judgements_used: int = 0
    parse_rate: float | None = None
    """judgements_used / judgements_planned (None when nothing was planned)."""
    by_scorer: dict[str, dict[str, int]] = field(default_factory=dict)
    """scorer → {planned, requested, used}."""
    example_unparsed_reply: str | None = None
    """One raw judgement reply that could not be parsed (raw text: escape it before showing it as HTML)."""
    example_degenerate_explanation: str | None = None
    """One raw explainer reply judged degenerate (raw text)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tally(name: str, results: Sequence[FeatureResult], before: dict[str, int], after: dict[str, int],
          family: str = "", num_latents: int = 0, live_features: int = 0) -> SAECounts:
    """The counts of one SAE from its feature results and the client's counts before / after it."""
    c = SAECounts(name, family, int(num_latents), int(live_features), features_sampled=len(results))
    for key, stat in (("requests", "requests"), ("cache_hits", "cache_hits"), ("http_retries", "retries"),
                      ("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens")):
        setattr(c, key, int(after.get(stat, 0)) - int(before.get(stat, 0)))
    reasons: Counter[str] = Counter()
    for r in results:
        c.explanations += 1
        c.explanations_retried += int(r.explanation_retried)
        if r.explanation_problem:
            reasons[r.explanation_problem] += 1
            if not c.example_degenerate_explanation:  # the first one with any text
                c.example_degenerate_explanation = r.explanation_raw
        used_any = False
        for scorer, (deciles, _) in r.judgements.items():
            planned, requested, used = len(r.planned[scorer]), r.requested[scorer], len(deciles)
            s = c.by_scorer.setdefault(scorer, {"planned": 0, "requested": 0, "used": 0})
            s["planned"] += planned
            s["requested"] += requested
            s["used"] += used
            used_any |= used > 0
        for rc in r.reply_counts.values():
            c.judgement_prompts += rc.prompts
            c.replies_unparsed += rc.malformed
            c.replies_recovered += rc.recovered
            c.prompts_lost += rc.lost
            if c.example_unparsed_reply is None and rc.bad_replies:
                c.example_unparsed_reply = rc.bad_replies[0]
        c.features_scored += int(used_any)
    c.explanations_degenerate = sum(reasons.values())
    c.degenerate_reasons = dict(sorted(reasons.items()))
    c.judgements_planned = sum(s["planned"] for s in c.by_scorer.values())
    c.judgements_requested = sum(s["requested"] for s in c.by_scorer.values())
    c.judgements_used = sum(s["used"] for s in c.by_scorer.values())
    c.parse_rate = c.judgements_used / c.judgements_planned if c.judgements_planned else None
    return c


def totals(counts: Sequence[SAECounts]) -> dict[str, Any]:
    """The counts summed over SAEs (parse_rate recomputed from the sums)."""
    keys = ["features_sampled", "features_scored", "requests", "cache_hits", "http_retries", "prompt_tokens",
            "completion_tokens", "explanations", "explanations_degenerate", "explanations_retried",
            "judgement_prompts", "replies_unparsed", "replies_recovered", "prompts_lost", "judgements_planned",
            "judgements_requested", "judgements_used"]
    out: dict[str, Any] = {k: sum(getattr(c, k) for c in counts) for k in keys}
    out["parse_rate"] = out["judgements_used"] / out["judgements_planned"] if out["judgements_planned"] else None
    return out


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.0f} %"


def describe_counts(c: SAECounts) -> str:
    """One line per SAE for the stage's output."""
    line = (f"{c.variant}: {c.features_scored} of {c.features_sampled} sampled features scored "
            f"({c.live_features} live of {c.num_latents}); judgements used {c.judgements_used}/{c.judgements_planned} "
            f"(parse rate {_pct(c.parse_rate)})")
    if c.requests or c.cache_hits or c.judgement_prompts:
        reasons = ", ".join(f"{k} {v}" for k, v in c.degenerate_reasons.items())
        line += (f"; {c.requests} requests, {c.cache_hits} from cache; explanations degenerate "
                 f"{c.explanations_degenerate}/{c.explanations}" + (f" ({reasons})" if reasons else "")
                 + f"; judgement replies unparsed {c.replies_unparsed}/{c.judgement_prompts}"
                 f" ({c.replies_recovered} recovered by the retry)")
    return line


def _show(text: str | None) -> str:
    if text is None:
        return "(none)"
    shown = text if len(text) <= SHOW_REPLY_CHARS else text[:SHOW_REPLY_CHARS] + f"… [{len(text)} characters]"
    return repr(shown)


def failure_message(bad: Sequence[SAECounts], min_rate: float, endpoint: dict[str, str | None],
                    cache_dir: str | None, stopped_early: bool = False) -> str:
    names = ", ".join(c.variant for c in bad)
    first = bad[0]
    lines = [
        f"the LLM's judgements are not usable for {names}: "
        + "; ".join(f"{c.variant} {c.judgements_used} of {c.judgements_planned} planned judgements used "
                    f"(parse rate {_pct(c.parse_rate)})" for c in bad)
        + (f", below half of autointerp.min_parse_rate = {_pct(min_rate)} after the first "
           f"{first.features_sampled} features, so the run stopped early" if stopped_early
           else f", below autointerp.min_parse_rate = {_pct(min_rate)}"),
        f"  endpoint: {endpoint.get('endpoint')}   model: {endpoint.get('model')}",
    ]
    for c in bad:
        reasons = ", ".join(f"{k} {v}" for k, v in c.degenerate_reasons.items()) or "none"
        lines.append(
            f"  {c.variant}: {c.requests} requests ({c.cache_hits} answered from the cache); explanations "
            f"degenerate {c.explanations_degenerate} of {c.explanations} ({reasons}; {c.explanations_retried} "
            f"retried); judgement replies unparsed {c.replies_unparsed} of {c.judgement_prompts} "
            f"({c.replies_recovered} recovered by the retry, {c.prompts_lost} lost)"
        )
    if first.example_unparsed_reply is not None:
        lines.append(f"  one raw judgement reply: {_show(first.example_unparsed_reply)}")
    if first.example_degenerate_explanation is not None:
        lines.append(f"  one raw explainer reply: {_show(first.example_degenerate_explanation)}")
    lines += [
        "  no scores were written (scores.csv, explanations.jsonl and summary.json are written only by a run that passes)"
        + (f"; the replies received are kept in {cache_dir} (a rerun of the same requests costs nothing)"
           if cache_dir else ""),
        "  check: (1) the model: an instruction-tuned chat model able to follow a fixed answer format "
        "(e.g. Llama-3.1-8B-Instruct; tiny models are not); (2) the prompt format: the server must apply the "
        "model's chat template; (3) max_tokens: autointerp.llm.explanation_max_tokens / judgement_max_tokens "
        "must leave room for one line / a list of llm.examples_per_prompt entries; (4) where the server "
        "supports structured output (vLLM, OpenAI), autointerp.llm.response_format: json_schema. "
        "See docs/autointerp.md",
    ]
    return "\n".join(lines)


def check_parse_rate(counts: Sequence[SAECounts], min_rate: float, endpoint: dict[str, str | None],
                     cache_dir: str | None, stopped_early: bool = False) -> None:
    """Raise :class:`AutointerpFailure` when some SAE's parse rate is below ``min_rate`` (below
    half of it for ``stopped_early``: the check made part-way through an SAE)."""
    threshold = min_rate / 2 if stopped_early else min_rate
    bad = [c for c in counts if c.parse_rate is not None and c.parse_rate < threshold]
    if bad:
        raise AutointerpFailure(failure_message(bad, min_rate, endpoint, cache_dir, stopped_early), list(counts))


def format_table(counts: Sequence[SAECounts]) -> str:
    """The per-SAE counts as a plain-text table (the stage prints it at the end)."""
    header = ["variant", "features scored", "requests", "cached", "degenerate expl.", "replies unparsed",
              "recovered", "judgements used", "parse rate"]
    rows = [[c.variant, f"{c.features_scored}/{c.features_sampled}", str(c.requests), str(c.cache_hits),
             f"{c.explanations_degenerate}/{c.explanations}", f"{c.replies_unparsed}/{c.judgement_prompts}",
             str(c.replies_recovered), f"{c.judgements_used}/{c.judgements_planned}", _pct(c.parse_rate)]
            for c in counts]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in [header] + rows)
