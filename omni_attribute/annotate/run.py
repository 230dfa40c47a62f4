"""The annotation run: pairs in, the trainer's JSONL out, resumable, with a summary.

Pairs whose id the output already holds are skipped (a torn last line is dropped first), the others go to
``concurrency`` workers; each pair's images are encoded at the configured size, the model is asked, and
its answer parsed and validated — a rejected answer is asked again (with the reason) up to
``prompt.max_rejections`` times. Accepted pairs are appended to the output (one fsynced line each),
rejected ones to ``<output>.rejected.jsonl`` (and asked again by the next run). Errors that concern the
whole run (key, model, no server; ``abort_after_failed_pairs`` pairs in a row lost to transport errors)
stop it; what was written stays valid and a later run resumes. ``<output>.summary.json`` holds the run's
numbers: pairs done and rejected (by reason), retries (by cause), tokens in and out (the server's
``usage``), request latency percentiles and throughput.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .client import ChatClient, RequestFailed
from .config import AnnotateConfig
from .errors import AnnotateError, AnswerRejected, EndpointError
from .images import ImageCache
from .output import DurableJsonl, RunLock, relative_path, scan_jsonl, write_json_atomic
from .pairs import PairTask, check_images
from .prompts import PROMPT_VERSION, build_messages, parse_answer, retry_messages

log = logging.getLogger("omni_attribute.annotate")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return {"p50": round(at(0.5), 4), "p90": round(at(0.9), 4), "p99": round(at(0.99), 4),
            "mean": round(sum(ordered) / len(ordered), 4), "max": round(ordered[-1], 4), "count": len(ordered)}


@dataclass
class RunState:
    done: int = 0
    rejected: int = 0
    rejected_reasons: dict = field(default_factory=dict)
    answer_rejections: dict = field(default_factory=dict)   # every rejected answer (also those fixed by a re-ask)
    repairs: dict = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pair_prompt_tokens: list = field(default_factory=list)       # accepted pairs, all asks included
    pair_completion_tokens: list = field(default_factory=list)
    request_latency: list = field(default_factory=list)
    pair_latency: list = field(default_factory=list)
    consecutive_failures: int = 0
    stopped: str | None = None

    @staticmethod
    def bump(table: dict, key: str) -> None:
        table[key] = table.get(key, 0) + 1


def make_backend(config: AnnotateConfig, api_key: str | None):
    if config.endpoint.backend == "transformers":
        from .local import LocalChat

        return LocalChat(config)
    if api_key is None and config.endpoint.api_key_env:
        api_key = os.environ.get(config.endpoint.api_key_env) or None
    return ChatClient(config.endpoint, api_key, config.seed)


def output_record(task: PairTask, annotation, folder: Path, config: AnnotateConfig, model: str, asks: int,
                  prompt_tokens: int, completion_tokens: int, latency: float) -> dict:
    record = {"id": task.id, "image_a": relative_path(task.image_a, folder), "image_b": relative_path(task.image_b, folder),
              "positive_attributes": annotation.positive_attributes, "negative_attributes": annotation.negative_attributes,
              "caption_a": annotation.caption_a, "caption_b": annotation.caption_b,
              "source": config.run.source or f"annotate:{model}",
              "annotator": {"model": model, "style": config.prompt.style, "prompt_version": PROMPT_VERSION,
                            "asks": asks, "repairs": annotation.repairs, "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens, "seconds": round(latency, 4)}}
    if config.run.keep_reasoning and annotation.reasoning:
        record["reasoning"] = annotation.reasoning
    return record


async def annotate_pair(task: PairTask, backend, images: ImageCache, config: AnnotateConfig, state: RunState,
                        folder: Path) -> tuple[dict | None, dict | None]:
    """(record, None) when accepted, (None, rejection) when not. Raises EndpointError and RequestFailed."""
    style = config.prompt.style
    a, b = await asyncio.gather(asyncio.to_thread(images.get, task.image_a), asyncio.to_thread(images.get, task.image_b))
    base = build_messages(style, a.url, b.url)
    messages = base
    started = time.perf_counter()
    prompt_tokens = completion_tokens = 0
    last: AnswerRejected | None = None
    text = ""
    for ask in range(config.prompt.max_rejections + 1):
        completion = await backend.complete(messages, style)
        state.request_latency.append(completion.latency_s)
        state.prompt_tokens += completion.prompt_tokens
        state.completion_tokens += completion.completion_tokens
        prompt_tokens += completion.prompt_tokens
        completion_tokens += completion.completion_tokens
        text = completion.text
        try:
            annotation = parse_answer(text, completion.finish_reason)
        except AnswerRejected as exc:
            last = exc
            state.bump(state.answer_rejections, exc.reason)
            messages = retry_messages(base, text, str(exc))
            continue
        for repair in annotation.repairs:   # counted by kind: quoted names left out
            state.bump(state.repairs, re.sub(r"'[^']*'", "…", repair))
        latency = time.perf_counter() - started
        state.pair_latency.append(latency)
        state.pair_prompt_tokens.append(prompt_tokens)
        state.pair_completion_tokens.append(completion_tokens)
        model = completion.model or getattr(backend, "name", "") or config.endpoint.model
        return output_record(task, annotation, folder, config, model, ask + 1, prompt_tokens, completion_tokens,
                             latency), None
    return None, {"id": task.id, "image_a": relative_path(task.image_a, folder),
                  "image_b": relative_path(task.image_b, folder), "reason": last.reason, "detail": last.detail,
                  "answer": text[:2000]}


async def annotate_async(tasks: list[PairTask], output: Path, config: AnnotateConfig, backend=None,
                         api_key: str | None = None) -> dict:
    from tqdm.auto import tqdm

    output = Path(output)
    folder = output.parent
    wall = time.perf_counter()
    with RunLock(output):
        existing, torn = scan_jsonl(output, repair=True)
        if torn:
            log.warning("%s ended in a torn line (a run was killed while writing): it was dropped and its pair is "
                        "annotated again", output.name)
        done_ids = {str(r.get("id")) for r in existing}
        wanted = {t.id for t in tasks}
        foreign = len(done_ids - wanted)
        if foreign:
            log.warning("%s holds %d pairs that are not in this run's pair list (kept as they are)", output.name, foreign)
        todo = [t for t in tasks if t.id not in done_ids]
        check_images(todo)
        state = RunState()
        own_backend = backend is None
        backend = make_backend(config, api_key) if backend is None else backend
        summary_base = {"output": str(output), "model": getattr(backend, "name", None) or config.endpoint.model,
                        "style": config.prompt.style, "pairs_total": len(tasks), "already_done": len(tasks) - len(todo),
                        "torn_line_dropped": torn}
        writer = DurableJsonl(output)
        rejects = DurableJsonl(output.with_name(output.name.removesuffix(".jsonl") + ".rejected.jsonl"))
        try:
            if config.endpoint.backend == "http" and config.endpoint.check_endpoint:
                await backend.check()
            images = ImageCache(config.image.min_pixels, config.image.max_pixels, config.image.format,
                                config.image.jpeg_quality)
            queue: asyncio.Queue = asyncio.Queue()
            for task in todo:
                queue.put_nowait(task)
            bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="pair", desc="annotating",
                       disable=not config.run.progress)

            async def worker() -> None:
                while True:
                    try:
                        task = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    try:
                        record, rejection = await annotate_pair(task, backend, images, config, state, folder)
                        state.consecutive_failures = 0
                    except RequestFailed as exc:
                        record, rejection = None, {"id": task.id, "image_a": relative_path(task.image_a, folder),
                                                   "image_b": relative_path(task.image_b, folder),
                                                   "reason": f"request failed: {exc.cause}", "detail": exc.detail}
                        if exc.transport:
                            state.consecutive_failures += 1
                            if state.consecutive_failures >= config.endpoint.abort_after_failed_pairs:
                                raise EndpointError(
                                    f"{state.consecutive_failures} pairs in a row failed ({exc}): the server is down or "
                                    "overloaded. The pairs written so far are kept; run the same command again to resume "
                                    "(lower endpoint.concurrency if the server is overloaded)") from exc
                    except AnnotateError as exc:  # an unreadable image: this pair only
                        if isinstance(exc, EndpointError):
                            raise
                        record, rejection = None, {"id": task.id, "reason": "unreadable image", "detail": str(exc)}
                    if record is not None:
                        writer.append(record)
                        state.done += 1
                    else:
                        rejects.append(rejection)
                        state.rejected += 1
                        state.bump(state.rejected_reasons, rejection["reason"])
                    bar.update(1)
                    bar.set_postfix(rejected=state.rejected)

            workers = 1 if config.endpoint.backend == "transformers" else config.endpoint.concurrency
            running = [asyncio.create_task(worker()) for _ in range(min(workers, max(1, len(todo))))]
            try:
                await asyncio.gather(*running)
            except BaseException:
                for job in running:
                    job.cancel()
                await asyncio.gather(*running, return_exceptions=True)
                raise
            finally:
                bar.close()
        except EndpointError as exc:
            state.stopped = str(exc)
            raise
        finally:
            writer.close()
            rejects.close()
            if own_backend:
                await backend.aclose()
            summary = build_summary(summary_base, state, backend, time.perf_counter() - wall, len(existing) + state.done)
            write_json_atomic(output.with_name(output.name.removesuffix(".jsonl") + ".summary.json"), summary)
    return summary


def build_summary(base: dict, state: RunState, backend, wall: float, in_file: int) -> dict:
    stats = backend.stats
    done = max(1, state.done)
    return {
        **base,
        "done": state.done, "rejected": state.rejected, "rejected_reasons": state.rejected_reasons,
        "pairs_in_file": in_file,
        "answers_rejected_then_asked_again": state.answer_rejections, "repairs": state.repairs,
        "requests": stats.requests, "retries": stats.retries, "http_statuses": {str(k): v for k, v in stats.statuses.items()},
        "structured_output": stats.structured_output,
        "tokens": {"prompt": state.prompt_tokens, "completion": state.completion_tokens,
                   "prompt_per_pair": round(sum(state.pair_prompt_tokens) / done, 2),
                   "completion_per_pair": round(sum(state.pair_completion_tokens) / done, 2)},
        "request_latency_s": percentiles(state.request_latency),
        "pair_latency_s": percentiles(state.pair_latency),
        "wall_s": round(wall, 3),
        "throughput": {"pairs_per_s": round(state.done / wall, 4) if wall > 0 else None,
                       "completion_tokens_per_s": round(state.completion_tokens / wall, 2) if wall > 0 else None},
        "stopped": state.stopped,
    }


def annotate(tasks: list[PairTask], output: str | Path, config: AnnotateConfig, backend=None,
             api_key: str | None = None) -> dict:
    """Annotate ``tasks`` into ``output`` (resuming what it holds); returns the summary."""
    if not tasks:
        raise AnnotateError("no pairs to annotate")
    return asyncio.run(annotate_async(tasks, Path(output), config, backend, api_key))


def format_summary(summary: dict) -> str:
    tokens, latency = summary["tokens"], summary.get("request_latency_s") or {}
    lines = [(f"[annotate] {summary['done']} pairs annotated, {summary['rejected']} rejected, "
              f"{summary['already_done']} already done; {summary['pairs_in_file']} pairs in {summary['output']}")]
    if summary["rejected_reasons"]:
        lines.append("  rejected: " + ", ".join(f"{k} ({v})" for k, v in summary["rejected_reasons"].items()))
    if summary["answers_rejected_then_asked_again"]:
        lines.append("  answers rejected and asked again: " + ", ".join(
            f"{k} ({v})" for k, v in summary["answers_rejected_then_asked_again"].items()))
    if summary["retries"]:
        lines.append("  retries: " + ", ".join(f"{k} ({v})" for k, v in summary["retries"].items()))
    lines.append(f"  tokens: {tokens['prompt']} in, {tokens['completion']} out "
                 f"({tokens['prompt_per_pair']:.0f} in / {tokens['completion_per_pair']:.0f} out per pair)")
    if latency:
        lines.append(f"  request latency: p50 {latency['p50']:.3f} s, p90 {latency['p90']:.3f} s, p99 {latency['p99']:.3f} s; "
                     f"{summary['throughput']['pairs_per_s']} pairs/s over {summary['wall_s']} s")
    if summary.get("stopped"):
        lines.append(f"  stopped: {summary['stopped']}")
    return "\n".join(lines)


def compare_summaries(teacher: dict, expert: dict) -> dict:
    """Teacher vs expert per annotated pair: input tokens, output tokens and latency, as ratios."""
    def ratio(a, b):
        return round(a / b, 3) if a and b else None
    t_lat, e_lat = teacher.get("pair_latency_s") or {}, expert.get("pair_latency_s") or {}
    return {
        "prompt_tokens_per_pair": {"teacher": teacher["tokens"]["prompt_per_pair"], "expert": expert["tokens"]["prompt_per_pair"],
                                   "ratio": ratio(teacher["tokens"]["prompt_per_pair"], expert["tokens"]["prompt_per_pair"])},
        "completion_tokens_per_pair": {"teacher": teacher["tokens"]["completion_per_pair"],
                                       "expert": expert["tokens"]["completion_per_pair"],
                                       "ratio": ratio(teacher["tokens"]["completion_per_pair"],
                                                      expert["tokens"]["completion_per_pair"])},
        "latency_per_pair_s": {"teacher": t_lat.get("mean"), "expert": e_lat.get("mean"),
                               "ratio": ratio(t_lat.get("mean"), e_lat.get("mean"))},
    }
