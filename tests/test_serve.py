"""`moshi-ttt serve`: moshi's web server with a TTT model answers over loopback."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
import sphn

from assets import write_plain_checkpoint

SAMPLE_RATE = 24000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{process.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("server did not start listening in time")


async def converse(port: int, seconds: float, n_audio: int) -> list[bytes]:
    """One connection: send `seconds` of a tone, return the first `n_audio` audio replies (and text between)."""
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.7 * t)).astype(np.float32)
    replies: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{port}/api/chat") as ws:
            assert (await ws.receive_bytes(timeout=60)) == b"\x00"
            for start in range(0, len(pcm), 1920):
                payload = writer.append_pcm(pcm[start:start + 1920])
                if len(payload):
                    await ws.send_bytes(b"\x01" + payload)
            while sum(r[:1] == b"\x01" for r in replies) < n_audio:
                replies.append(await ws.receive_bytes(timeout=60))
    return replies


@pytest.fixture
def ttt_model_dir(tmp_path):
    """The final/ of a one-step training run from a plain checkpoint with Mimi and a tokenizer."""
    from moshi_ttt.train import TrainConfig, train
    plain = write_plain_checkpoint(tmp_path / "plain", with_assets=True, lm_gen_config={"use_sampling": False})
    train(TrainConfig.from_dict({
        "model": str(plain), "mode": "ttt", "max_steps": 1, "ckpt_freq": 1, "batch_size": 1, "seq_frames": 16,
        "do_eval": False, "run_dir": str(tmp_path / "run"),
        "ttt": {"every": 2, "chunk_size": 4, "init": "normal", "init_std": 0.2, "eta": 0.2},
        "data": {"synthetic": {"num_documents": 2, "frames": 16, "pairs": 1, "spacing": 4}}}))
    return tmp_path / "run" / "final"


def test_server_answers_and_each_connection_starts_fresh(ttt_model_dir):
    """On a trained final/ as it is, with no flags: the CPU, and no web client offline."""
    port = free_port()
    env = dict(os.environ, NO_TORCH_COMPILE="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "moshi_ttt.cli", "serve", "--model", str(ttt_model_dir),
               "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, process)
        first = asyncio.run(converse(port, seconds=3.0, n_audio=25))
        second = asyncio.run(converse(port, seconds=3.0, n_audio=25))
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert sum(r[:1] == b"\x01" for r in first) == 25
    assert all(len(r) > 1 for r in first)
    # Greedy decoding: the same audio gives the same answer only if nothing carried over.
    assert second == first


def test_serving_defaults_pick_the_cpu_and_serve_without_a_client_offline(monkeypatch, capsys):
    from moshi_ttt import serve
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(serve.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(serve, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("x")))
    assert serve.with_serving_defaults(["--port", "1"]) == ["--port", "1", "--device", "cpu", "--static", "none"]
    printed = capsys.readouterr().out
    assert "serving on the CPU" in printed and "give a client with --static DIR" in printed
    given = ["--device", "cuda", "--static=web"]
    assert serve.with_serving_defaults(given) == given
    monkeypatch.setattr(serve, "hf_hub_download", lambda *a, **k: "/cache/dist.tgz")
    assert serve.with_serving_defaults([]) == ["--device", "cpu"]
