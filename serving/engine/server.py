"""The HTTP face of the engine emulator: vLLM's OpenAI-compatible server over the engine model.

Endpoints (FACTS.md section 1): GET /health, GET|POST /ping, GET /version, GET /load, GET /v1/models
(card with max_model_len), POST /v1/completions, POST /v1/chat/completions (SSE streaming and not,
usage, stream_options.include_usage, continue_final_message, add_generation_prompt, max_tokens,
ignore_eos), POST /tokenize, GET /metrics; and the admin API POST|GET /admin/faults (faults.py).
Request checks, error texts and stream chunks follow vLLM 0.11.0; each cites its vLLM file.

Time: the engine lives in engine time, `time_scale` times faster than the wall clock. Each step is
planned by the model, slept for `duration / time_scale` real seconds, then committed; while the engine
is busy its steps follow each other in engine time, whether the timer woke on time or a little late
(`CATCH_UP_S`), and when the process falls behind it does not sleep, so engine-time figures stay
those of the model.

Programmatic use (integration tests of other parts):

    from gpufleet.serving.engine.server import run_emulator_in_thread, spawn_emulator
    with run_emulator_in_thread(EngineConfig(model="llama-3.1-8b", gpu="H100"), time_scale=20) as h:
        h.url            # "http://127.0.0.1:PORT"
        h.set_faults(status_503=True); h.clear_faults(); h.stats()
    proc = spawn_emulator(["--model", "llama-3.1-8b", "--gpu", "H100"]); proc.url; proc.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence

from aiohttp import web
from gpufleet.serving.engine import faults as faultlib
from gpufleet.serving.engine import tokenizer as tk
from gpufleet.serving.engine.metrics import EngineMetrics, garbage_metrics
from gpufleet.serving.engine.model import FINISHED, Engine, EngineConfig, EngineStats, Request, resolve

VLLM_VERSION = "0.11.0"  # the vLLM release whose API and metric names the emulator follows


class EmulatorError(ValueError):
    """The emulator cannot start with this configuration; the message says why."""


def build_engine(config: EngineConfig) -> Engine:
    from gpufleet.serving.sizing import SizingError
    from gpufleet.stacks.catalog import CatalogError

    try:
        return Engine(resolve(config))
    except (CatalogError, SizingError, ValueError) as exc:
        raise EmulatorError(str(exc)) from None


def _error(
    status: int, message: str, etype: str = "BadRequestError", param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": param, "code": status}}
    return web.json_response(body, status=status)


class _BadRequest(Exception):
    def __init__(
        self, message: str, status: int = 400, etype: str = "BadRequestError", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.etype, self.param = status, etype, param


def _validation_error(body: dict, text: str) -> _BadRequest:
    """A request-model validator's ValueError as vLLM 0.11 answers it: FastAPI's
    RequestValidationError with pydantic's error list, turned into a 400 whose type is
    "Bad Request" by validation_exception_handler (vllm/entrypoints/openai/api_server.py)."""
    err = {"type": "value_error", "loc": ("body",), "msg": f"Value error, {text}", "input": body}
    err["ctx"] = {"error": ValueError(text)}
    return _BadRequest(str([err]), etype="Bad Request")


def _check_generation_prompt(body: dict) -> None:
    """ChatCompletionRequest / TokenizeChatRequest.check_generation_prompt (vLLM 0.11.0,
    vllm/entrypoints/openai/protocol.py), a `mode="before"` validator: it sees the raw body, so it
    refuses only the pair given explicitly; the default add_generation_prompt=true meets
    transformers' own check later (_chat_prompt)."""
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        raise _validation_error(
            body, "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )


def _check_stream_options(body: dict) -> None:
    """CompletionRequest / ChatCompletionRequest.validate_stream_options (vLLM 0.11.0,
    vllm/entrypoints/openai/protocol.py): stream_options need stream=true."""
    if body.get("stream_options") and not body.get("stream"):
        raise _validation_error(body, "Stream options can only be defined when `stream=True`.")


# How late (wall seconds) a busy engine's next step may start and still follow the previous one
# back to back in engine time: the event loop's timer granularity and the work between two steps.
CATCH_UP_S = 0.005
# vLLM's API server runs on uvicorn, whose listen backlog defaults to 2048 (uvicorn docs, settings,
# --backlog); aiohttp's is 128.
LISTEN_BACKLOG = 2048
# The emulator's own /metrics series: engine seconds stepped, and stalled (see EmulatorServer.busy_s)
STALL_METRICS = ("gpufleet_emulator_busy_seconds_total", "gpufleet_emulator_stalled_seconds_total")


class EmulatorServer:
    """One emulated vLLM engine behind aiohttp. Create, `await start(host, port)`, `await stop()`."""

    def __init__(
        self,
        config: EngineConfig | Engine,
        time_scale: float = 1.0,
        admin_token: str | None = None,
        faults: Sequence[str] | dict | None = None,
        enable_server_load_tracking: bool = False,
    ) -> None:
        if time_scale <= 0:
            raise EmulatorError("time_scale must be > 0")
        self.engine = config if isinstance(config, Engine) else build_engine(config)
        self.model_name = self.engine.cfg.served_model_name
        self.metrics = EngineMetrics(self.engine, self.model_name)
        self.time_scale = time_scale
        self.admin_token = admin_token
        self.faults = faultlib.FaultState()
        initial: dict = {}
        if isinstance(faults, dict):
            initial = dict(faults)
        else:
            for spec in faults or ():
                initial.update(faultlib.parse_flag(spec))
        self._initial_faults = initial
        self.host = "127.0.0.1"
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self._t0 = 0.0
        self._vtime = 0.0
        # Engine seconds the model stepped, and those its steps started late because this process
        # fell behind (a busy engine's next step due, the loop elsewhere): the share says whether
        # the machine kept up with the time scale (`STALL_METRICS`, read by the bench and the demo).
        self.busy_s = 0.0
        self.stalled_s = 0.0
        self._wake: asyncio.Event | None = None
        self._unhang: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._reopen: asyncio.Task | None = None
        # GET /load: vLLM counts the generation requests in flight only with
        # --enable-server-load-tracking (off by default) and answers 0 otherwise
        self.enable_server_load_tracking = enable_server_load_tracking
        self.server_load = 0

    # -- clock -----------------------------------------------------------------------------------

    def now(self) -> float:
        """Engine time: wall seconds since start x time_scale."""
        return (asyncio.get_running_loop().time() - self._t0) * self.time_scale

    async def _drive(self) -> None:
        engine = self.engine
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        busy = False  # the previous step ended with work left: the next one follows it at once
        while True:
            if not engine.has_work():
                busy = False
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self.now()
            # A busy engine's steps run back to back in engine time. The loop's timer wakes up to a
            # millisecond late (uvloop rounds to whole ms), which at a few ms per step would make the
            # engine 15-30 % slower than its model; so a late wake-up, within CATCH_UP_S of wall
            # time, does not count. A longer stall (the process starved) is real delay.
            if busy and now - self._vtime <= CATCH_UP_S * self.time_scale:
                start = self._vtime
            else:
                if busy:
                    self.stalled_s += now - self._vtime
                start = max(self._vtime, now)
            plan = engine.schedule(start)
            if plan is None:  # nothing schedulable (cannot happen with a sized cache); retry soon
                self._vtime, busy = start, False
                await asyncio.sleep(0.001)
                continue
            end = start + plan.duration
            delay = self._t0 + end / self.time_scale - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # let the handlers run
            self._vtime = end
            self.busy_s += plan.duration
            engine.commit(plan, end)
            busy = True

    # -- lifecycle -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/ping", self.ping)
        app.router.add_get("/version", self.version)
        app.router.add_get("/load", self.load)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/admin/faults", self.admin_faults)
        app.router.add_post("/admin/faults", self.admin_faults)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self._wake = asyncio.Event()
        self._unhang = asyncio.Event()
        self._unhang.set()
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        self.host = host
        self.site = web.TCPSite(self.runner, host, port, reuse_address=True, backlog=LISTEN_BACKLOG)
        try:
            await self.site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise EmulatorError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sockets = getattr(self.site._server, "sockets", None)  # an asyncio.Server once started
        self.port = sockets[0].getsockname()[1] if sockets else port
        self._driver = asyncio.create_task(self._drive())
        if self._initial_faults:
            await self.set_faults(self._initial_faults)
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._reopen:
            self._reopen.cancel()
        if self._unhang:
            self._unhang.set()
        if self._driver:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        if self.runner:
            await self.runner.cleanup()

    # -- faults ----------------------------------------------------------------------------------

    async def set_faults(self, body: dict, spare=None) -> dict:
        """Apply a fault body (see faults.py) and return the state. `spare`: a connection not to
        drop when refusing (the admin request's own)."""
        was_refusing = self.faults.refuse_connections
        faultlib.apply(self.faults, body)
        f = self.faults
        self.engine.slowdown = f.slow_factor
        assert self._unhang is not None
        if f.hang:
            self._unhang.clear()
        else:
            self._unhang.set()
        if f.refuse_connections and not was_refusing:
            await self._close_listener(spare)
            if f.refuse_for_s:
                self._reopen = asyncio.create_task(self._reopen_after(f.refuse_for_s))
        elif was_refusing and not f.refuse_connections:
            await self._open_listener()
        return f.as_dict()

    async def _close_listener(self, spare=None) -> None:
        if self.site is not None:
            await self.site.stop()
            self.site = None
        if self.runner is not None and self.runner.server is not None:
            for proto in list(self.runner.server.connections):
                if proto is spare:
                    continue
                proto.force_close()
                if proto.transport is not None:
                    proto.transport.abort()

    async def _open_listener(self) -> None:
        if self._reopen and self._reopen is not asyncio.current_task():
            self._reopen.cancel()
        self._reopen = None
        if self.site is None and self.runner is not None:
            self.site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True, backlog=LISTEN_BACKLOG)
            await self.site.start()

    async def _reopen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.faults.refuse_connections = False
        self.faults.refuse_for_s = None
        await self._open_listener()

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if not request.path.startswith("/admin/"):
            if self.faults.hang:
                assert self._unhang is not None
                await self._unhang.wait()
            if self.faults.status_503:
                return _error(503, "The engine is unavailable (injected fault).", "ServiceUnavailableError")
        try:
            return await handler(request)
        except _BadRequest as exc:
            return _error(exc.status, str(exc), exc.etype, exc.param)
        except web.HTTPNotFound:
            return _error(404, f"Not Found: {request.path}", "NotFoundError")
        except web.HTTPMethodNotAllowed:
            return _error(405, f"Method {request.method} not allowed on {request.path}", "MethodNotAllowed")

    async def admin_faults(self, request: web.Request) -> web.Response:
        if not faultlib.token_ok(self.admin_token, request.headers.get("Authorization")):
            if not self.admin_token:
                return _error(404, "the admin API is off (start with an admin token)", "NotFoundError")
            return _error(401, "missing or wrong bearer token", "AuthenticationError")
        if request.method == "GET":
            return web.json_response(self.faults.as_dict())
        body = await _json_body(request)
        try:
            state = await self.set_faults(body, spare=request.protocol)
        except faultlib.FaultError as exc:
            raise _BadRequest(str(exc)) from None
        resp = web.json_response(state)
        if state["refuse_connections"]:
            resp.force_close()
        return resp

    # -- simple endpoints ------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION})

    async def load(self, request: web.Request) -> web.Response:
        # vllm/entrypoints/openai/api_server.py get_server_load_metrics: always routed; the count
        # moves only with --enable-server-load-tracking (vllm/entrypoints/utils.py load_aware_call)
        return web.json_response({"server_load": self.server_load})

    async def models(self, request: web.Request) -> web.Response:
        # vllm/entrypoints/openai/serving_models.py show_available_models and protocol.py
        # ModelCard / ModelPermission at v0.11.0: root is the model `vllm serve` was given, one
        # default permission object, `created` the time of the call
        now = int(time.time())
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": now,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {
            "id": self.model_name,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": self.engine.cfg.model_path or self.model_name,
            "parent": None,
            "max_model_len": self.engine.cfg.max_model_len,
            "permission": [permission],
        }
        return web.json_response({"object": "list", "data": [card]})

    async def metrics_text(self, request: web.Request) -> web.Response:
        if self.faults.garbage_metrics:
            return web.Response(text=garbage_metrics(), content_type="text/plain")
        return web.Response(
            body=self.metrics.render().encode() + self._stall_metrics(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    def _stall_metrics(self) -> bytes:
        """The emulator's own series (vLLM has no such thing): its engine seconds stepped and stalled."""
        busy, stalled = STALL_METRICS
        return (
            f"# HELP {busy} engine seconds the emulated engine stepped\n# TYPE {busy} counter\n"
            f"{busy} {self.busy_s!r}\n"
            f"# HELP {stalled} engine seconds its steps started late because the process fell behind\n"
            f"# TYPE {stalled} counter\n{stalled} {self.stalled_s!r}\n"
        ).encode()

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if "messages" in body:
            _check_generation_prompt(body)
            text, _ = self._chat_prompt(body)
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise _BadRequest("give 'prompt' (a string) or 'messages'", param="prompt")
        ids = tk.encode(text)
        return web.json_response(
            {
                "count": len(ids),
                "max_model_len": self.engine.cfg.max_model_len,
                "tokens": ids,
                "token_strs": None,
            }
        )

    # -- generation ------------------------------------------------------------------------------

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise _BadRequest(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")

    def _chat_prompt(self, body: dict) -> tuple[str, str]:
        """(prompt text, role of the reply). vLLM 0.11 defaults add_generation_prompt to true
        whatever continue_final_message says (vllm/entrypoints/openai/protocol.py), so
        continue_final_message alone meets transformers' refusal of the pair; serving_chat.py and
        serving_tokenization.py answer it 400 as f"{e} {e.__cause__}", the cause being the same
        error (chat_utils.py apply_hf_chat_template re-raises it as ValueError(str(e)) from e).
        The reply's role is the last message's when no generation prompt is added
        (serving_chat.py get_chat_request_role)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _BadRequest("'messages' must be a non-empty list of message objects", param="messages")
        cont = body.get("continue_final_message", False)
        add_gen = body.get("add_generation_prompt", True)
        if not isinstance(cont, bool) or not isinstance(add_gen, bool):
            raise _BadRequest("continue_final_message and add_generation_prompt must be booleans")
        try:
            text = tk.apply_chat_template(messages, add_generation_prompt=add_gen, continue_final_message=cont)
        except ValueError as exc:
            raise _BadRequest(f"{exc} {exc}") from None
        role = "assistant" if add_gen else str(messages[-1].get("role", "assistant"))
        return text, role

    def _sampling(self, body: dict, prompt_ids: list[int], chat: bool) -> tuple[int, bool, int | None]:
        """(max_tokens as vLLM resolves it, ignore_eos, natural stop) or a 400 with vLLM 0.11's text."""
        n = body.get("n", 1)
        if n != 1:
            raise _BadRequest("the emulator serves n=1 only", param="n")
        if chat:
            # vllm/entrypoints/openai/serving_engine.py _validate_input and utils.py get_max_tokens:
            # `max_completion_tokens or max_tokens` (a 0 falls through), no default
            requested = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            requested = body.get("max_tokens", 16)  # protocol.py CompletionRequest: 16 by default
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)):
            raise _BadRequest("max_tokens must be an integer", param="max_tokens")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _BadRequest("ignore_eos must be a boolean", param="ignore_eos")
        limit = self.engine.cfg.max_model_len
        n_in = len(prompt_ids)
        if chat:
            # serving_engine.py _validate_input, answered by serving_chat.py as f"{e} {e.__cause__}"
            # (no cause: the text ends in " None")
            if n_in >= limit:
                raise _BadRequest(
                    f"This model's maximum context length is {limit} tokens. However, your request has "
                    f"{n_in} input tokens. Please reduce the length of the input messages. None"
                )
            if requested is not None and n_in + requested > limit:
                raise _BadRequest(
                    f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's "
                    f"maximum context length is {limit} tokens and your request has {n_in} input tokens "
                    f"({requested} > {limit} - {n_in}). None"
                )
        else:
            # vllm/entrypoints/renderer.py _create_tokens_prompt, with max_length = max_model_len -
            # (max_tokens or 0) from serving_completion.py _build_render_config
            max_length = limit - (requested or 0)
            if n_in > max_length:
                raise _BadRequest(
                    f"This model's maximum context length is {max_length} tokens. However, your request "
                    f"has {n_in} input tokens. Please reduce the length of the input messages."
                )
        # utils.py get_max_tokens: what was asked, capped by what the context leaves
        max_tokens = limit - n_in if requested is None else min(limit - n_in, requested)
        if max_tokens < 1:  # sampling_params.py SamplingParams._verify_args
            raise _BadRequest(f"max_tokens must be at least 1, got {max_tokens}.")
        problem = self.engine.validate(n_in, max_tokens)
        if problem:
            raise _BadRequest(problem, param="prompt")
        eos_after = None if ignore_eos else tk.natural_length(prompt_ids)
        return max_tokens, ignore_eos, eos_after

    @contextlib.contextmanager
    def _load_tracked(self) -> Iterator[None]:
        """vllm/entrypoints/utils.py load_aware_call: with tracking on, a generation request counts in
        GET /load from its handler's start until its response is sent."""
        if not self.enable_server_load_tracking:
            yield
            return
        self.server_load += 1
        try:
            yield
        finally:
            self.server_load -= 1

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        _check_stream_options(body)
        with self._load_tracked():
            self._check_model(body)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = tk.encode(prompt)
            elif (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            ):
                ids = list(prompt)
            else:
                raise _BadRequest("'prompt' must be a non-empty string or a list of token ids", param="prompt")
            if not ids:
                raise _BadRequest("the prompt is empty", param="prompt")
            max_tokens, ignore_eos, eos_after = self._sampling(body, ids, chat=False)
            return await self._generate(request, body, ids, max_tokens, ignore_eos, eos_after, None)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        _check_generation_prompt(body)
        _check_stream_options(body)
        with self._load_tracked():
            self._check_model(body)
            text, role = self._chat_prompt(body)
            ids = tk.encode(text)
            max_tokens, ignore_eos, eos_after = self._sampling(body, ids, chat=True)
            return await self._generate(request, body, ids, max_tokens, ignore_eos, eos_after, role)

    async def _generate(
        self,
        request: web.Request,
        body: dict,
        ids: list[int],
        max_tokens: int,
        ignore_eos: bool,
        eos_after: int | None,
        role: str | None,
    ) -> web.StreamResponse:
        """Run the request; `role` is the chat reply's (None: a completion)."""
        chat = role is not None
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest("stream must be a boolean", param="stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _BadRequest("stream_options must be an object", param="stream_options")
        include_usage = bool(opts.get("include_usage", False))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()

        def on_token(req: Request, n: int, t: float) -> None:
            q.put_nowait(n)

        def on_finish(req: Request, t: float) -> None:
            q.put_nowait(None)

        req = Request(
            request_id=rid,
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            eos_after=eos_after,
            ignore_eos=ignore_eos,
            on_token=on_token,
            on_finish=on_finish,
        )
        self.engine.add_request(req, self.now())
        assert self._wake is not None
        self._wake.set()
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        try:
            if not stream:
                while await q.get() is not None:
                    pass
                text = tk.decode(req.output_token_ids or [])
                if chat:
                    choice = {
                        "index": 0,
                        "message": {"role": role, "content": text, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": req.finish_reason,
                        "stop_reason": None,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": req.finish_reason,
                        "stop_reason": None,
                    }
                return web.json_response(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": self.model_name,
                        "choices": [choice],
                        "usage": _usage(req),
                    }
                )
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            head = {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": self.model_name,
            }

            async def send(payload: dict) -> None:
                await resp.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

            # Chunks as vLLM 0.11.0 serializes them: chat with exclude_unset (serving_chat.py
            # chat_completion_stream_generator), completions with every field (serving_completion.py
            # completion_stream_generator, whose first chunk carries the prompt's token ids).
            sent = 0
            outs = req.output_token_ids
            assert outs is not None
            while True:
                n = await q.get()
                if n is None:
                    break
                if chat and sent == 0:
                    # the role chunk goes out with the first output, not before the prefill
                    delta = {"role": role, "content": ""}
                    first = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                    await send({**head, "choices": [first], "prompt_token_ids": None})
                for tok in outs[sent : sent + n]:
                    cut = self.faults.break_stream_after_tokens
                    if cut is not None and sent >= cut:
                        self.engine.abort(rid, self.now())
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    text = tk.token_text(tok)
                    sent += 1
                    # the last token's chunk carries finish_reason (the output that finishes a
                    # request carries its last text); the request finished in the step that made
                    # the token, before this coroutine ran, so its status already says so
                    finish = req.finish_reason if req.status == FINISHED and sent == req.num_output_tokens else None
                    if chat:
                        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
                        if finish is not None:
                            choice["stop_reason"] = None
                        choice["token_ids"] = None
                        await send({**head, "choices": [choice]})
                    else:
                        choice = {
                            "index": 0,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": finish,
                            "stop_reason": None,
                            "prompt_token_ids": ids if sent == 1 else None,
                            "token_ids": None,
                        }
                        await send({**head, "choices": [choice], "usage": None})
            if include_usage:  # the usage chunk: exclude_none in both generators
                usage = _usage(req)
                usage.pop("prompt_tokens_details")
                await send({**head, "choices": [], "usage": usage})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.abort(rid, self.now())
            raise
        finally:
            if req.status != FINISHED:
                self.engine.abort(rid, self.now())


def _usage(req: Request) -> dict:
    # vllm/entrypoints/openai/protocol.py UsageInfo field order
    return {
        "prompt_tokens": req.prompt_len,
        "total_tokens": req.prompt_len + req.num_output_tokens,
        "completion_tokens": req.num_output_tokens,
        "prompt_tokens_details": None,
    }


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise _BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    return body


# ------------------------------------------------------------------------------------------------
# Running it: forever (the CLI), in a thread (tests in the same process), as a subprocess


def serve_forever(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    time_scale: float = 1.0,
    admin_token: str | None = None,
    faults: Sequence[str] = (),
    announce=print,
    enable_server_load_tracking: bool = False,
) -> None:
    """Serve until interrupted; prints `listening on http://HOST:PORT` once the socket is bound."""
    server = EmulatorServer(
        config,
        time_scale=time_scale,
        admin_token=admin_token,
        faults=faults,
        enable_server_load_tracking=enable_server_load_tracking,
    )

    async def main() -> None:
        await server.start(host, port)
        cfg = server.engine.cfg
        announce(
            f"listening on {server.url} model={cfg.served_model_name} gpu={cfg.gpu_key} "
            f"tp={cfg.tensor_parallel_size} blocks={cfg.num_gpu_blocks}x{cfg.block_size} "
            f"max_model_len={cfg.max_model_len} time_scale={time_scale:g}"
        )
        sys.stdout.flush()
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    asyncio.run(main())


class EmulatorHandle:
    """An emulator running in a background thread of this process (see run_emulator_in_thread)."""

    def __init__(
        self, server: EmulatorServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self.server = server
        self.loop = loop
        self.thread = thread

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def admin_token(self) -> str | None:
        return self.server.admin_token

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def set_faults(self, **fields) -> dict:
        """Same fields as POST /admin/faults, e.g. set_faults(status_503=True) or refuse_connections=True."""
        return self._call(self.server.set_faults(fields))

    def clear_faults(self) -> dict:
        return self._call(self.server.set_faults({"clear": True}))

    def stats(self) -> EngineStats:
        async def get() -> EngineStats:
            return self.server.engine.stats()

        return self._call(get())

    def stop(self, timeout: float = 10.0) -> None:
        if not self.loop.is_closed() and self.thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self.server.stop(), timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)

    def __enter__(self) -> EmulatorHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_emulator_in_thread(
    config: EngineConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    time_scale: float = 1.0,
    admin_token: str | None = "auto",
    faults: Sequence[str] | dict | None = None,
    enable_server_load_tracking: bool = False,
) -> EmulatorHandle:
    """Start an emulator on its own event loop in a daemon thread; returns once it is listening.

    `admin_token="auto"` makes a random token (handle.admin_token); None turns the admin API off.
    Raises EmulatorError for a bad config or a port that cannot be bound.
    """
    token = secrets.token_urlsafe(16) if admin_token == "auto" else admin_token
    server = EmulatorServer(
        config or EngineConfig(),
        time_scale=time_scale,
        admin_token=token,
        faults=faults,
        enable_server_load_tracking=enable_server_load_tracking,
    )
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start(host, port))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            started["error"] = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name=f"engine-emulator-{port}", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in started:
        raise started["error"]
    return EmulatorHandle(server, loop, thread)


class SubprocessEmulator:
    """An emulator in its own process (`python -m gpufleet.serving.engine`); see spawn_emulator."""

    def __init__(self, proc: subprocess.Popen, url: str, admin_token: str | None) -> None:
        self.proc = proc
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.admin_token = admin_token

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> SubprocessEmulator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_emulator(
    args: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    admin_token: str | None = "auto",
    timeout: float = 30.0,
) -> SubprocessEmulator:
    """Start `python -m gpufleet.serving.engine ARGS --port 0` and wait until it serves /health.

    `args` are the CLI flags (e.g. ["--model", "llama-3.1-8b", "--gpu", "H100", "--time-scale", "10"]).
    The admin token goes through the environment variable GPUFLEET_EMULATOR_ADMIN_TOKEN.
    """
    import urllib.request

    token = secrets.token_urlsafe(16) if admin_token == "auto" else admin_token
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "gpufleet.serving.engine", *args, "--host", host, "--port", "0"]
    if token:
        env["GPUFLEET_EMULATOR_ADMIN_TOKEN"] = token
        cmd += ["--admin-token-env", "GPUFLEET_EMULATOR_ADMIN_TOKEN"]
    import tempfile

    errfile = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty child must never block on it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile, text=True, env=env)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        errfile.seek(0)
        err = errfile.read()
        raise EmulatorError(f"the emulator did not start: {(line + err).strip()[-2000:]}")
    url = line.split()[2]
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return SubprocessEmulator(proc, url, token)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise EmulatorError(f"the emulator at {url} did not answer /health within {timeout:g} s")
