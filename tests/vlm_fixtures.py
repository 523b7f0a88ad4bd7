"""Tiny Qwen2.5-VL models built offline, and a real ``transformers serve`` for them.

Two models share one architecture (2 text layers, hidden 64, vision depth 2):

* **random**: randomly initialised; its answers are noise, often with special
  tokens inside the content. It exercises the malformed-output paths.
* **scripted**: the same random model with a few weights set so that greedy
  decoding answers ``SCRIPTED_ANSWER`` to any prompt: the attention and MLP
  output projections are zeroed, so the last hidden state is the last token's
  embedding, and the LM head maps the prompt's final token to one added token
  that holds the whole answer, and that token to ``<|im_end|>``. The answer
  is one JSON object that every parser accepts (a grounding box, an
  expression, a verification verdict), so it exercises the happy paths
  through the real library and the real server.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a
tiny corpus, with Qwen's special tokens and a Qwen2-VL style chat template.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: What the scripted model answers (greedy) to every prompt.
SCRIPTED_ANSWER = json.dumps(
    {
        "bbox_2d": [8, 8, 40, 40],
        "label": "red square",
        "expression": "the red square in the top left corner",
        "category_correct": True,
        "coverage_complete": True,
        "missed_instances": 0,
        "reason": "it is a red square",
    }
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Locate every object in the image and output bbox_2d coordinates and a label in JSON format.",
    '[{"bbox_2d": [12, 34, 56, 78], "label": "cat"}, {"bbox_2d": [1, 2, 3, 4], "label": "dog"}]',
    "Write one referring expression for the highlighted target: the red mug left of the laptop.",
    '{"category_correct": true, "coverage_complete": false, "missed_instances": 2, "reason": "ok"}',
    "You are a helpful assistant. system user assistant image photo box highlighted green red",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ {}[]()\":,.;!?'-_/\n",
]


def build_tokenizer(out_dir: Path, extra_tokens: list[str]) -> None:
    """Trains a byte-level BPE on a tiny corpus and saves it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    if extra_tokens:
        fast.add_tokens(extra_tokens)  # normal (not special) tokens: decoded into the answer
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def build_tiny_qwen25vl(out_dir: str | Path, *, scripted: bool = False, seed: int = 0) -> Path:
    """Builds and saves a tiny Qwen2.5-VL with its processor.

    Args:
        out_dir: folder to write (created).
        scripted: set weights so that greedy decoding answers ``SCRIPTED_ANSWER``.
        seed: torch seed of the random init.

    Returns:
        The folder, loadable with ``AutoModelForImageTextToText`` /
        ``AutoProcessor`` and servable with ``transformers serve``.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, [SCRIPTED_ANSWER] if scripted else [])
    tok = AutoTokenizer.from_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tok)
    hidden = 64
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
            "tie_word_embeddings": False,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    if scripted:
        _script(model, tok, ids["<|im_end|>"])
    model.generation_config = GenerationConfig(
        do_sample=True,  # else transformers ignores a request's temperature
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        max_new_tokens=64,
    )
    model.save_pretrained(out)
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    return out


def _script(model, tok, im_end_id: int) -> None:
    """Makes greedy decoding a two-step chain: prompt end -> answer token -> <|im_end|>."""
    import torch

    answer_id = tok.convert_tokens_to_ids(SCRIPTED_ANSWER)
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    trigger_id = int(tok(text)["input_ids"][-1])
    lm = model.language_model if hasattr(model, "language_model") else model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = lm.embed_tokens.weight
        norm_w = lm.norm.weight
        head = model.lm_head.weight
        head.zero_()
        # Logit of token b given last token a is head[b] . rmsnorm(emb[a]):
        # point head[b] along rmsnorm(emb[a]) for each link a -> b.
        for a, b in ((trigger_id, answer_id), (answer_id, im_end_id)):
            h = emb[a] * torch.rsqrt(emb[a].pow(2).mean() + 1e-6) * norm_w
            head[b] += 50.0 * h / h.norm()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(model_dir: str | Path | None, port: int | str = "{port}", host: str = "127.0.0.1") -> list[str]:
    """argv of ``transformers serve`` on CPU.

    Args:
        model_dir: the model to pin the server to; None serves any local model
            path a request names (one server for several tiny models).
        port: port, or the ``{port}`` placeholder of ``ManagedServerCaptioner``.
        host: interface.
    """
    exe = Path(sys.executable).parent / "transformers"
    pinned = [str(model_dir)] if model_dir is not None else []
    return [str(exe), "serve", *pinned, "--host", host, "--port", str(port), "--device", "cpu"]


def serve_env(hub_cache: str | Path) -> dict[str, str]:
    """Environment of an offline ``transformers serve`` (``/v1/models`` needs an existing HF_HUB_CACHE)."""
    Path(hub_cache).mkdir(parents=True, exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "TRANSFORMERS_VERBOSITY": "error"}


@contextlib.contextmanager
def transformers_server(model_dir: str | Path | None, hub_cache: str | Path, log_path: str | Path, timeout_s: float = 120.0) -> Iterator[str]:
    """Runs ``transformers serve`` on a free port; yields its base URL (``.../v1``).

    Args:
        model_dir: pin the server to this model; None serves any local path.
        hub_cache: an existing folder for ``HF_HUB_CACHE``.
        log_path: the server's stdout and stderr.
        timeout_s: readiness deadline.
    """
    from orsgen.stages.caption.backends import http_get_json

    port = free_port()
    env = {**os.environ, **serve_env(hub_cache)}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            serve_command(model_dir, port), stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}: {Path(log_path).read_text()[-3000:]}")
            try:
                http_get_json(f"{base}/models", timeout_s=2)
                break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve not ready in {timeout_s} s: {Path(log_path).read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


# ------------------------------------------------------------------ a scripted HTTP server


class MockOpenAIServer:
    """A real HTTP server on 127.0.0.1 that speaks ``/v1/chat/completions``.

    What it answers is decided per request by ``script(body, n)`` (``n``
    counts requests from 0), which returns ``(status, payload, headers,
    delay_s)``: a dict payload is sent as JSON, a str as text. The default
    script answers ``answer`` after ``latency_s``. It records every request
    body and the most requests it ever held at once. Delays are capped at
    ``max_delay_s`` so that no test can hang on it.
    """

    def __init__(self, script=None, *, answer: str = "[]", latency_s: float = 0.0, max_delay_s: float = 5.0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.answer = answer
        self.latency_s = latency_s
        self._script = script or self.default_script
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode() if isinstance(payload, (dict, list)) else str(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if isinstance(payload, (dict, list)) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "mock-vl", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                with outer._lock:
                    n = len(outer.bodies)
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, payload, headers, delay = outer._script(body, n)
                    time.sleep(min(delay, max_delay_s))
                    self._send(status, payload, headers)
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

        class Server(ThreadingHTTPServer):
            # socketserver's default listen backlog (5) refuses connections
            # when more requests are in flight on a loaded machine.
            request_queue_size = 128

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @staticmethod
    def completion(body: dict, content) -> dict:
        """An OpenAI chat completion answering ``content``."""
        return {
            "id": "cmpl-mock",
            "object": "chat.completion",
            "model": body.get("model", "mock-vl"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }

    def default_script(self, body: dict, n: int):
        return 200, self.completion(body, self.answer), {}, self.latency_s

    @property
    def requests(self) -> int:
        """Requests received so far."""
        return len(self.bodies)

    def __enter__(self) -> "MockOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
