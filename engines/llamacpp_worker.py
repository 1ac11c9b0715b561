"""One llama.cpp replica: a thin OpenAI-compatible HTTP server around `llama_cpp.Llama`.

Run by the agent as its own OS process (`python -m wattops.engines.llamacpp_worker`), so a
crash or a hang in native code takes down one replica, never the agent. llama-cpp-python's
bundled server is not used because it does not report how many prompt tokens came from the
KV (prefix) cache; this worker reports them as `usage.prompt_tokens_details.cached_tokens`,
the OpenAI field, and exports llama-server-compatible Prometheus counters at /metrics.

llama.cpp's context is not safe to share between threads, so requests are served one at a
time by a single inference thread; concurrency comes from running more replicas.

Streamed answers are generated here, not by llama-cpp-python's streaming loop: that loop
detokenizes the pending tokens again on every step while they do not form whole UTF-8
characters, which byte-fallback tokens (random weights, some scripts) rarely do, so a long
answer grew quadratic and blocked the replica for minutes. This one decodes each token's bytes
once, incrementally, and checks at every token whether the client is still there. Token
counters advance per token, so the agent can tell a replica that makes no progress from one
that is busy.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

#: OpenAI sampling fields passed through to llama.cpp, with the type each must have.
_NUMBER = (int, float)
_PASSTHROUGH: dict[str, tuple[type, ...]] = {
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": (int,),
    "min_p": _NUMBER,
    "max_tokens": (int,),
    "seed": (int,),
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "repeat_penalty": _NUMBER,
}


class BadRequest(ValueError):
    """The request body is not something this worker can serve; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _alternatives(value: Any, most: int, param: str) -> int:
    """A number of alternative tokens to report (OpenAI: 0..20 in chat, 0..5 in completions)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise BadRequest(f"`{param}` must be an integer from 0 to {most}", param)
    return value


class Worker:
    """Owns the model and the single inference thread."""

    def __init__(self, args: argparse.Namespace) -> None:
        import llama_cpp  # heavy native import, done once the arguments are known

        self.model_id = args.name
        self.precision = args.precision
        self.default_max_tokens = args.default_max_tokens
        #: False: evaluate every prompt from scratch (no KV reuse between requests).
        self.prefix_cache = args.prefix_cache
        self.llm = llama_cpp.Llama(
            model_path=args.model,
            n_ctx=args.ctx,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            seed=args.seed,
            verbose=False,
        )
        self._generate = self.llm.generate
        self.llm.generate = self._counting_generate  # type: ignore[method-assign,assignment]
        self._is_eog = lambda token: bool(
            llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token)
        )
        self.last_prompt_tokens = 0
        self.last_completion_tokens = 0
        self.created = int(time.time())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self.registry = CollectorRegistry()
        # Names follow llama-server's /metrics so one parser reads both engines.
        self.prompt_tokens = Counter(
            "llamacpp:prompt_tokens", "Prompt tokens processed", registry=self.registry
        )
        self.predicted_tokens = Counter(
            "llamacpp:tokens_predicted", "Generated tokens", registry=self.registry
        )
        self.processing = Gauge(
            "llamacpp:requests_processing", "Requests being processed", registry=self.registry
        )
        self.cached_tokens = Counter(
            "wattops:prompt_tokens_cached",
            "Prompt tokens reused from the KV cache",
            registry=self.registry,
        )
        self.requests = Counter("wattops:requests", "Answered requests", registry=self.registry)
        self.busy = Counter(
            "wattops:busy_seconds", "Seconds spent running the model", registry=self.registry
        )

    def _counting_generate(self, tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
        # llama-cpp-python reports no usage on streamed answers; counting what its
        # completion loop consumes gives the same figures as its non-streamed usage. The
        # /metrics counters move per token: progress is visible while an answer is made.
        self.last_prompt_tokens = len(tokens)
        self.last_completion_tokens = 0
        self.prompt_tokens.inc(len(tokens))
        for token in self._generate(tokens, *args, **kwargs):
            if not self._is_eog(token):
                self.last_completion_tokens += 1
                self.predicted_tokens.inc()
            yield token

    def _prompt_tokens(self, prompt: str | list[int]) -> list[int]:
        """The prompt's tokens exactly as llama-cpp-python's completion builds them."""
        if isinstance(prompt, list):
            return prompt
        model = self.llm._model
        bos = model.token_cls() if model.token_cls() != -1 else self.llm.token_bos()
        head = [bos] if model.add_bos_token() and bos != -1 else []
        sep = model.token_sep()
        tail = (
            []
            if not model.add_eos_token() and sep == -1
            else [sep if sep != -1 else self.llm.token_eos()]
        )
        body = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return head + (body if prompt else []) + tail

    def _stream_completion(
        self,
        prompt: str | list[int],
        *,
        cancelled: threading.Event,
        max_tokens: int | None = None,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        logprobs: int | None = None,
        **_ignored: Any,
    ) -> Iterator[dict[str, Any]]:
        """OpenAI completion chunks for `prompt`, one per token that completes text.

        Each token's bytes are decoded once (an incremental UTF-8 decoder holds at most an
        unfinished character), text that may begin a stop sequence is held back until it
        cannot, and `cancelled` is checked at every token. Sampling, seeding and the context
        limit follow llama-cpp-python's own completion, so streamed and unstreamed answers
        agree. With `logprobs` (the number of alternatives, 0 for none), each chunk carries
        the log-probabilities of the tokens it holds under the model's own distribution
        (before temperature and penalties), in completion format; llama-cpp-python's chat
        handler turns that into the chat format.
        """
        tokens = self._prompt_tokens(prompt)
        n_ctx = self.llm.n_ctx()
        room = n_ctx - len(tokens)
        if room <= 0:
            raise ValueError(
                f"the prompt is {len(tokens)} tokens, more than this model's context of {n_ctx} "
                "tokens: shorten it"
            )
        if max_tokens is None:  # the request gave none: the worker's default, as room allows
            max_tokens = min(self.default_max_tokens, room)
        elif max_tokens > room:
            # As OpenAI answers: an impossible max_tokens is refused, not quietly cut.
            raise BadRequest(
                f"max_tokens is too large: {max_tokens}. The context is {n_ctx} tokens and the "
                f"prompt takes {len(tokens)}: at most {room} completion tokens",
                "max_tokens",
            )
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self.llm.set_seed(
            seed if seed is not None else random.Random(self.llm._seed).randint(0, 2**32)
        )
        head = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_id}  # fmt: skip

        scored: list[tuple[str, float, dict[str, float]]] = []  # tokens not yet sent

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            lp = None
            if logprobs is not None and (scored or text):
                lp = {"tokens": [t for t, _, _ in scored],
                      "token_logprobs": [p for _, p, _ in scored],
                      "top_logprobs": [top for _, _, top in scored],
                      "text_offset": [0] * len(scored)}  # fmt: skip
                scored.clear()
            choice = {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}
            return {**head, "choices": [choice]}

        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # as unstreamed
        pending = ""  # decoded, not yet sent: may be the start of a stop sequence
        finish = "length"
        produced = 0
        generator = self.llm.generate(
            tokens, top_k=top_k, top_p=top_p, min_p=min_p, temp=temperature,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
        )  # fmt: skip
        try:
            for token in generator:
                if cancelled.is_set():
                    finish = "cancelled"
                    break
                if self._is_eog(token):
                    finish = "stop"
                    break
                produced += 1
                piece = self.llm._model.detokenize([token])
                if logprobs is not None:
                    scored.append(self._scored(token, piece, logprobs))
                pending += decoder.decode(piece)
                cut = min((pending.find(s) for s in stops if s in pending), default=-1)
                if cut >= 0:
                    pending, finish = pending[:cut], "stop"
                    break
                hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])),
                           default=0)  # fmt: skip
                if len(pending) > hold:
                    yield chunk(pending[: len(pending) - hold], None)
                    pending = pending[len(pending) - hold :]
                if produced >= max_tokens:
                    break
        finally:
            generator.close()
        if finish == "cancelled":
            return
        pending += decoder.decode(b"", final=True)
        if pending:
            yield chunk(pending, None)
        yield chunk("", finish)

    def _scored(self, token: int, piece: bytes, alternatives: int
                ) -> tuple[str, float, dict[str, float]]:  # fmt: skip
        """The token's text and log-probability, and its `alternatives` likeliest rivals, from
        the logits it was sampled from: the context's last row (llama-cpp-python keeps no copy
        unless every row is kept, and its sampler leaves the row as it was)."""
        row = self.llm._ctx.get_logits_ith(-1)
        logits = np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).astype(np.float64)
        top = float(logits.max())
        log_total = top + math.log(float(np.exp(logits - top).sum()))
        rivals: dict[str, float] = {}
        if alternatives > 0:
            best = np.argpartition(-logits, alternatives)[:alternatives]
            for i in best[np.argsort(-logits[best])]:
                text = self.llm._model.detokenize([int(i)]).decode("utf-8", "replace")
                rivals[text] = float(logits[i]) - log_total
        text = piece.decode("utf-8", "replace")
        return text, float(logits[token]) - log_total, rivals

    # -- request parsing -------------------------------------------------------------------

    def _params(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key, types in _PASSTHROUGH.items():
            if key in body and body[key] is not None:
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, types):
                    raise BadRequest(f"`{key}` must be a number", key)
                params[key] = value
        if params.get("max_tokens", 1) < 1:
            raise BadRequest("`max_tokens` must be at least 1", "max_tokens")
        if body.get("n") not in (None, 1):
            raise BadRequest("only n=1 is supported; run more replicas for throughput", "n")
        stop = body.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise BadRequest("`stop` must be a string or a list of strings", "stop")
            params["stop"] = stop
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("`messages` must be a non-empty list", "messages")
            for msg in messages:
                if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                    raise BadRequest("each message needs a string `role`", "messages")
                if not isinstance(msg.get("content"), str | None):
                    raise BadRequest("message `content` must be a string", "messages")
            params["messages"] = messages
            wanted = body.get("logprobs")
            if wanted is not None and not isinstance(wanted, bool):
                raise BadRequest("`logprobs` must be a boolean", "logprobs")
            if wanted:
                params["logprobs"] = True
                params["top_logprobs"] = _alternatives(body.get("top_logprobs"), 20,
                                                       "top_logprobs")  # fmt: skip
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("`prompt` must be a string", "prompt")
            params["prompt"] = prompt
            if body.get("logprobs") is not None:
                params["logprobs"] = _alternatives(body["logprobs"], 5, "logprobs")
        return params

    # -- inference (runs on the single inference thread) -----------------------------------

    def _cached_prefix(self, before: list[int], prompt_tokens: int) -> int:
        # llama.cpp keeps the KV of the previous sequence and re-evaluates only the part of
        # the new prompt after the longest common prefix (always at least the last token).
        after = self.llm.input_ids[:prompt_tokens].tolist()
        n = 0
        for a, b in zip(before, after[:-1], strict=False):
            if a != b:
                break
            n += 1
        return n

    def _forget_kv(self) -> None:
        # llama-cpp-python reuses the longest common prefix of the KV it holds; resetting the
        # token count makes the next prompt evaluate in full, as a server without a prompt
        # cache would (llama-server's `cache_prompt: false`).
        if not self.prefix_cache:
            self.llm.reset()

    def complete(self, params: dict[str, Any], chat: bool) -> dict[str, Any]:
        """Blocking: run one request to the end and return the OpenAI answer."""
        started = time.perf_counter()
        self._forget_kv()
        before = self.llm.input_ids[: self.llm.n_tokens].tolist()
        try:
            with self._own_completions(threading.Event()) as completion:
                if chat:
                    result: Any = self.llm.create_chat_completion(**params)
                else:
                    result = completion(**params)
        finally:
            self.busy.inc(time.perf_counter() - started)
        usage = result["usage"]
        cached = self._cached_prefix(before, usage["prompt_tokens"])
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
        result["model"] = self.model_id
        self._count(usage)
        return dict(result)

    @contextlib.contextmanager
    def _own_completions(self, cancelled: threading.Event) -> Iterator[Any]:
        """For the time of one request, llama-cpp-python's chat handler (which formats the
        messages with the model's chat template, then asks for a completion) gets this
        worker's completion instead of its own; yields that completion."""

        def completion(stream: bool = False, **kwargs: Any) -> Any:
            chunks = self._stream_completion(cancelled=cancelled, **kwargs)
            return chunks if stream else self._assemble(chunks)

        self.llm.create_completion = completion  # type: ignore[method-assign,assignment]
        try:
            yield completion
        finally:
            del self.llm.create_completion

    def _assemble(self, chunks: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """One unstreamed completion from the chunks of a streamed one."""
        text, finish, head = [], None, None
        logprobs: dict[str, list[Any]] | None = None
        for chunk in chunks:
            head = head or chunk
            choice = chunk["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
            if choice["logprobs"] is not None:
                logprobs = logprobs or {k: [] for k in choice["logprobs"]}
                for key, values in choice["logprobs"].items():
                    logprobs[key].extend(values)
        assert head is not None
        prompt, completion = self.last_prompt_tokens, self.last_completion_tokens
        choice = {"text": "".join(text), "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }}  # fmt: skip

    def stream(
        self, params: dict[str, Any], chat: bool, emit: Any, cancelled: threading.Event
    ) -> dict[str, Any]:
        """Blocking: run one streaming request, calling `emit(chunk)` per chunk; returns usage."""
        started = time.perf_counter()
        self._forget_kv()
        before = self.llm.input_ids[: self.llm.n_tokens].tolist()

        try:
            with self._own_completions(cancelled) as completion:
                if chat:
                    chunks: Any = self.llm.create_chat_completion(**params, stream=True)
                else:
                    chunks = completion(stream=True, **params)
                for chunk in chunks:
                    chunk["model"] = self.model_id
                    emit(chunk)
        finally:
            self.busy.inc(time.perf_counter() - started)
        prompt_tokens = self.last_prompt_tokens
        completion_tokens = self.last_completion_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self._cached_prefix(before, prompt_tokens)},
        }
        self._count(usage)
        return usage

    def _count(self, usage: dict[str, Any]) -> None:
        # Prompt and generated tokens were counted as they went (_counting_generate).
        self.requests.inc()
        self.cached_tokens.inc(usage["prompt_tokens_details"]["cached_tokens"])

    # -- HTTP ------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "precision": self.precision})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "wattops"}
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            params = self._params(body, chat)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the body is not valid JSON: {exc}")
        except BadRequest as exc:
            return _error(400, str(exc), exc.param)
        loop = asyncio.get_running_loop()
        self.processing.inc()
        try:
            if not body.get("stream"):
                try:
                    result = await loop.run_in_executor(self.executor, self.complete, params, chat)
                except ValueError as exc:  # a prompt or max_tokens beyond the context
                    return _error(400, str(exc), getattr(exc, "param", None))
                return web.Response(body=orjson.dumps(result), content_type="application/json")
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await self._stream(request, params, chat, include_usage)
        finally:
            self.processing.dec()

    async def _stream(
        self, request: web.Request, params: dict[str, Any], chat: bool, include_usage: bool
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(chunk: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        def run() -> dict[str, Any]:
            try:
                return self.stream(params, chat, emit, cancelled)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        job = loop.run_in_executor(self.executor, run)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        first: dict[str, Any] | None = None
        try:
            # Headers wait for the first chunk: a request refused before any token (a prompt or
            # max_tokens beyond the context) gets a plain 400, as OpenAI answers it.
            chunk = await queue.get()
            if chunk is None:
                await job  # raises what refused it
            await response.prepare(request)
            while chunk is not None:
                first = first or chunk
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                chunk = await queue.get()
            usage = await job
            if include_usage and first is not None:
                tail = {
                    "id": first["id"],
                    "object": first["object"],
                    "created": first["created"],
                    "model": self.model_id,
                    "choices": [],
                    "usage": usage,
                }
                await response.write(b"data: " + orjson.dumps(tail) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            cancelled.set()  # the client went away: stop generating for it
            with contextlib.suppress(Exception):
                await job
            raise
        except ValueError as exc:  # e.g. the prompt is longer than the context
            cancelled.set()
            if not response.prepared:
                return _error(400, str(exc), getattr(exc, "param", None))
            # Headers are gone: say so in the stream (OpenAI's error shape), and no [DONE].
            error = {"error": {"message": str(exc), "type": "invalid_request_error"}}
            with contextlib.suppress(ConnectionResetError):
                await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
                await response.write_eof()
        return response


def build_app(worker: Worker) -> web.Application:
    """The worker's aiohttp application."""
    app = web.Application(client_max_size=16 * 2**20)
    app.router.add_get("/health", worker.health)
    app.router.add_get("/metrics", worker.metrics)
    app.router.add_get("/v1/models", worker.models)
    app.router.add_post("/v1/chat/completions", worker.chat_completions)
    app.router.add_post("/v1/completions", worker.completions)
    return app


async def _serve(args: argparse.Namespace) -> None:
    worker = Worker(args)
    runner = web.AppRunner(build_app(worker), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # The agent reads this line to learn the port; the model is loaded by now.
    print(f"LISTENING {port} {uuid.uuid4().hex}", flush=True)
    # Nobody reads stdout after the handshake: send anything else printed to the log.
    os.dup2(2, 1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m wattops.engines.llamacpp_worker --model M.gguf ...`."""
    parser = argparse.ArgumentParser(prog="wattops.engines.llamacpp_worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True, help="model id reported to clients")
    parser.add_argument("--precision", default="unknown")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="evaluate every prompt in full instead of reusing the KV of the previous one",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
