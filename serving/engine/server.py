"""The HTTP face of the engine emulator: vLLM's OpenAI-compatible server over the engine model.

Endpoints (FACTS.md section 1): GET /health, GET|POST /ping, GET /version, GET /v1/models (card with
max_model_len), POST /v1/completions, POST /v1/chat/completions (SSE streaming and not, usage,
stream_options.include_usage, continue_final_message, add_generation_prompt, max_tokens,
ignore_eos), POST /tokenize, GET /metrics; and the admin API POST|GET /admin/faults (faults.py).

Time: the engine lives in engine time, `time_scale` times faster than the wall clock. Each step is
planned by the model, slept for `duration / time_scale` real seconds, then committed; when the
process falls behind it does not sleep, so engine-time figures stay those of the model.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web
from gpufleet.serving.engine import faults as faultlib
from gpufleet.serving.engine import tokenizer as tk
from gpufleet.serving.engine.metrics import EngineMetrics, garbage_metrics
from gpufleet.serving.engine.model import Engine, EngineConfig, EngineStats, Request, resolve

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


@dataclass
class _Stream:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class EmulatorServer:
    """One emulated vLLM engine behind aiohttp. Create, `await start(host, port)`, `await stop()`."""

    def __init__(
        self,
        config: EngineConfig | Engine,
        time_scale: float = 1.0,
        admin_token: str | None = None,
        faults: Sequence[str] | dict | None = None,
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
        self._wake: asyncio.Event | None = None
        self._unhang: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._reopen: asyncio.Task | None = None
        self._created = int(time.time())

    # -- clock -----------------------------------------------------------------------------------

    def now(self) -> float:
        """Engine time: wall seconds since start x time_scale."""
        return (asyncio.get_running_loop().time() - self._t0) * self.time_scale

    async def _drive(self) -> None:
        engine = self.engine
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            start = max(self._vtime, self.now())
            plan = engine.schedule(start)
            if plan is None:  # nothing schedulable (cannot happen with a sized cache); retry soon
                self._vtime = start
                await asyncio.sleep(0.001)
                continue
            end = start + plan.duration
            delay = self._t0 + end / self.time_scale - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # let the handlers run
            self._vtime = end
            engine.commit(plan, end)

    # -- lifecycle -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/ping", self.ping)
        app.router.add_get("/version", self.version)
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
        self.site = web.TCPSite(self.runner, host, port, reuse_address=True)
        try:
            await self.site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise EmulatorError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        server = self.site._server
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port
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
            self.site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
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

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm",
            "root": self.model_name,
            "parent": None,
            "max_model_len": self.engine.cfg.max_model_len,
            "permission": [],
        }
        return web.json_response({"object": "list", "data": [card]})

    async def metrics_text(self, request: web.Request) -> web.Response:
        if self.faults.garbage_metrics:
            return web.Response(text=garbage_metrics(), content_type="text/plain")
        return web.Response(
            body=self.metrics.render().encode(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if "messages" in body:
            text = self._chat_prompt(body)
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

    def _chat_prompt(self, body: dict) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _BadRequest("'messages' must be a non-empty list of message objects", param="messages")
        cont = body.get("continue_final_message", False)
        add_gen = body.get("add_generation_prompt", not cont)
        if not isinstance(cont, bool) or not isinstance(add_gen, bool):
            raise _BadRequest("continue_final_message and add_generation_prompt must be booleans")
        if cont and messages[-1].get("role") != "assistant":
            raise _BadRequest(
                "continue_final_message needs the last message to be the assistant's", param="messages"
            )
        try:
            return tk.apply_chat_template(
                messages, add_generation_prompt=add_gen, continue_final_message=cont
            )
        except ValueError as exc:
            raise _BadRequest(str(exc), param="messages") from None

    def _sampling(
        self, body: dict, prompt_ids: list[int], default_max: int | None
    ) -> tuple[int, bool, int | None]:
        n = body.get("n", 1)
        if n != 1:
            raise _BadRequest("the emulator serves n=1 only", param="n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max))
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _BadRequest("ignore_eos must be a boolean", param="ignore_eos")
        limit = self.engine.cfg.max_model_len
        if max_tokens is None:
            max_tokens = max(1, limit - len(prompt_ids))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _BadRequest("max_tokens must be a whole number >= 1", param="max_tokens")
        problem = self.engine.validate(len(prompt_ids), max_tokens)
        if problem:
            raise _BadRequest(problem, param="max_tokens" if prompt_ids else "prompt")
        eos_after = None if ignore_eos else tk.natural_length(prompt_ids)
        return max_tokens, ignore_eos, eos_after

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
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
        max_tokens, ignore_eos, eos_after = self._sampling(body, ids, 16)
        return await self._generate(request, body, ids, max_tokens, ignore_eos, eos_after, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body)
        ids = tk.encode(self._chat_prompt(body))
        max_tokens, ignore_eos, eos_after = self._sampling(body, ids, None)
        return await self._generate(request, body, ids, max_tokens, ignore_eos, eos_after, chat=True)

    async def _generate(
        self,
        request: web.Request,
        body: dict,
        ids: list[int],
        max_tokens: int,
        ignore_eos: bool,
        eos_after: int | None,
        chat: bool,
    ) -> web.StreamResponse:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest("stream must be a boolean", param="stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _BadRequest("stream_options must be an object", param="stream_options")
        include_usage = bool(opts.get("include_usage", False))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        metrics = self.metrics

        def on_token(req: Request, n: int, t: float) -> None:
            metrics.observe_tokens(req, n, t)
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
                        "message": {"role": "assistant", "content": text, "tool_calls": []},
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
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"

            async def send(choices: list, usage: dict | None = None) -> None:
                payload = {
                    "id": rid,
                    "object": chunk_obj,
                    "created": created,
                    "model": self.model_name,
                    "choices": choices,
                }
                if usage is not None:
                    payload["usage"] = usage
                await resp.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

            if chat:
                await send(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            sent = 0
            outs = req.output_token_ids
            assert outs is not None
            while True:
                n = await q.get()
                if n is None:
                    break
                pieces = outs[sent : sent + n]
                for tok in pieces:
                    cut = self.faults.break_stream_after_tokens
                    if cut is not None and sent >= cut:
                        self.engine.abort(rid, self.now())
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    text = tk.token_text(tok)
                    if chat:
                        await send(
                            [
                                {
                                    "index": 0,
                                    "delta": {"content": text},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    else:
                        await send(
                            [
                                {
                                    "index": 0,
                                    "text": text,
                                    "logprobs": None,
                                    "finish_reason": None,
                                    "stop_reason": None,
                                }
                            ]
                        )
                    sent += 1
            if chat:
                await send(
                    [
                        {
                            "index": 0,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": req.finish_reason,
                            "stop_reason": None,
                        }
                    ]
                )
            else:
                await send(
                    [
                        {
                            "index": 0,
                            "text": "",
                            "logprobs": None,
                            "finish_reason": req.finish_reason,
                            "stop_reason": None,
                        }
                    ]
                )
            if include_usage:
                await send([], _usage(req))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.abort(rid, self.now())
            raise
        finally:
            if req.status != "finished":
                self.engine.abort(rid, self.now())


def _usage(req: Request) -> dict:
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
) -> None:
    """Serve until interrupted; prints `listening on http://HOST:PORT` once the socket is bound."""
    server = EmulatorServer(config, time_scale=time_scale, admin_token=admin_token, faults=faults)

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
) -> EmulatorHandle:
    """Start an emulator on its own event loop in a daemon thread; returns once it is listening.

    `admin_token="auto"` makes a random token (handle.admin_token); None turns the admin API off.
    Raises EmulatorError for a bad config or a port that cannot be bound.
    """
    token = secrets.token_urlsafe(16) if admin_token == "auto" else admin_token
    server = EmulatorServer(config or EngineConfig(), time_scale=time_scale, admin_token=token, faults=faults)
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
