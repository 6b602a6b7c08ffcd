"""Latent descriptions: contexts with marked tokens, histogram, logit lens, the token-lookup explanation and its
held-out score, reward firing; and the LLM path against a local OpenAI-style test server (protocol, timeout,
non-200, bad JSON)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from mechrl.analysis.describe import (
    DescribeSpec, TokenCorpus, describe_latents, histogram, histograms_figure, lens_tokens, pearson,
)
from mechrl.analysis.llm_describe import LLMEndpoint, LLMError, chat, describe_and_score, simulate
from mechrl.errors import UserError

TEXTS = [f"RED {i % 10} BLUE {(3 * i) % 10}" + (" RED 7" if i % 3 == 0 else "") for i in range(300)]


def _corpus(tok, rewards=None):
    enc = tok(TEXTS, add_special_tokens=False)["input_ids"]
    ex = torch.repeat_interleave(torch.arange(len(TEXTS)), torch.tensor([len(e) for e in enc]))
    pos = torch.cat([torch.arange(len(e)) for e in enc])
    return TokenCorpus.build(tok, TEXTS, ex, pos, held_out_fraction=0.25, seed=0, rewards=rewards), enc


def test_token_detector_is_explained_perfectly_and_noise_is_not(cards_tok):
    """Latent 0 fires 2.0 on every RED token (a pure token detector): the explanation is that token and scores 1.
    Latent 1 is independent noise: its explanation scores near 0 on held-out texts."""
    rewards = [t.count("RED") for t in TEXTS]
    corpus, enc = _corpus(cards_tok, rewards)
    reds = [cards_tok(w, add_special_tokens=False)["input_ids"][0] for w in ("RED", " RED")]  # two tokens
    assert reds[0] != reds[1]
    g = torch.Generator().manual_seed(0)
    n = len(corpus.input_ids)
    codes = torch.zeros(n, 3)
    codes[:, 0] = 2.0 * torch.isin(corpus.input_ids, torch.tensor(reds)).float()
    codes[:, 1] = torch.relu(torch.randn(n, generator=g))
    desc = describe_latents(codes, corpus, [0, 1, 2], spec=DescribeSpec(n_contexts=4, n_tokens=2, after=6))
    d0, d1, d2 = desc
    assert sorted(t["token"] for t in d0["explanation"]["tokens"]) == [" RED", "RED"]
    assert d0["explanation"]["score"] == pytest.approx(1.0)
    assert d0["explanation"]["tokens"][0]["mean_act"] == pytest.approx(2.0)
    assert abs(d1["explanation"]["score"]) < 0.2
    assert d2["explanation"]["score"] is None and "never fires" in d2["explanation"]["undefined"]
    # contexts: one per text, the activating token marked [[...]], other active tokens [...]
    ctx = d0["contexts"]
    assert len(ctx) == 4 and len({c["text"] for c in ctx}) == 4 and all(c["activation"] == 2.0 for c in ctx)
    assert all("[[RED]]" in c["context"].replace(" ", "") for c in ctx)
    assert any("[RED]" in c["context"].replace(" ", "").replace("[[RED]]", "") for c in ctx)  # texts with two REDs
    assert d2["contexts"] == []
    # reward: texts with 2 REDs (the top quantile) vs 1 RED; latent 0 fires on every text, latent 2 never
    assert d0["reward"]["high"] == 1.0 and d0["reward"]["low"] == 1.0 and d2["reward"]["high"] == 0.0
    assert d0["freq"] == pytest.approx(float(torch.isin(corpus.input_ids, torch.tensor(reds)).float().mean()))


def test_reward_firing_separates(cards_tok):
    rewards = [1.0 if i % 3 == 0 else 0.0 for i in range(len(TEXTS))]
    corpus, _ = _corpus(cards_tok, rewards)
    seven = cards_tok(" 7", add_special_tokens=False)["input_ids"][-1]
    codes = torch.zeros(len(corpus.input_ids), 1)
    # fires on the last token of the texts with the extra "RED 7" only
    for t in range(len(TEXTS)):
        if t % 3 == 0:
            codes[int(corpus.offsets[t]) + len(corpus.tokens[t]) - 1, 0] = 1.0
    (d,) = describe_latents(codes, corpus, [0])
    assert d["reward"]["high"] == 1.0 and d["reward"]["low"] == 0.0
    assert seven in corpus.input_ids.tolist()


def test_histogram_and_pearson():
    h = histogram(torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 4.0]), bins=3)
    assert h["n_zero"] == 2 and h["counts"] == [1, 1, 2]  # [1,2) [2,3) [3,4]: and h["edges"][0] == 1.0 and h["edges"][-1] == 4.0
    assert histogram(torch.zeros(4))["counts"] == []
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 1, 1]), torch.tensor([2.0, 4, 6])) is None


def test_logit_lens_of_an_unembedding_row(cards_tok):
    from mechrl.config import TinyModelConfig
    from mechrl.models.loading import build_tiny_model

    model = build_tiny_model(TinyModelConfig(arch="llama", n_layer=1, d_model=32, n_head=4), cards_tok, seed=0)
    W = model.get_output_embeddings().weight.detach()
    red = cards_tok("RED", add_special_tokens=False)["input_ids"][0]
    lens = lens_tokens(model, W[red], cards_tok, n=3)
    assert lens["top"][0]["token"] == cards_tok.decode([red])
    assert lens["top"][0]["logit"] == pytest.approx(float(W[red] @ W[red]), rel=1e-5)  # RMSNorm gain is 1 at init
    lens = lens_tokens(model, -W[red], cards_tok, n=3, allowed_ids=torch.tensor([red, 5, 6]))
    assert lens["bottom"][0]["token"] == cards_tok.decode([red]) and len(lens["top"]) == 3


def test_corpus_checks_rows(cards_tok):
    with pytest.raises(ValueError, match="every token"):
        TokenCorpus.build(cards_tok, TEXTS[:2], torch.tensor([0, 0]), torch.tensor([0, 1]))
    corpus, _ = _corpus(cards_tok)
    with pytest.raises(AssertionError, match="rows"):
        describe_latents(torch.zeros(3, 2), corpus, [0])
    with pytest.raises(IndexError, match="out of range"):
        describe_latents(torch.zeros(len(corpus.input_ids), 2), corpus, [2])
    assert histograms_figure(describe_latents(torch.rand(len(corpus.input_ids), 2), corpus, [0, 1])).startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------------- LLM


class _Server:
    """A local OpenAI-style chat server; `mode` picks its behaviour; requests are recorded."""

    def __init__(self):
        self.mode = "ok"
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if outer.mode == "slow":
                    time.sleep(1.0)
                if outer.mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"internal\nerror")
                    return
                if outer.mode == "badjson":
                    payload = b"<html>not json</html>"
                else:
                    system = body["messages"][0]["content"]
                    if "predict" in system:
                        texts = json.loads(body["messages"][1]["content"])["texts"]
                        # "simulate" RED detection: 10 on RED tokens
                        acts = [[10 if t.strip() == "RED" else 0 for t in x] for x in texts]
                        if outer.mode == "short":
                            acts = [a[:-1] for a in acts]
                        content = json.dumps({"activations": acts})
                    else:
                        content = "fires on the word RED"
                    payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_llm_speaks_the_chat_protocol_and_is_scored(server, cards_tok):
    ep = LLMEndpoint(url=server.url, model="test-model", api_key="sekret", timeout_s=5)
    corpus, _ = _corpus(cards_tok)
    reds = torch.tensor([cards_tok(w, add_special_tokens=False)["input_ids"][0] for w in ("RED", " RED")])
    acts = 2.0 * torch.isin(corpus.input_ids, reds).float()
    res = describe_and_score(ep, acts, corpus, ["[[RED]] 3 BLUE 9"], n_texts=4)
    assert res["description"] == "fires on the word RED"
    assert res["score"] == pytest.approx(1.0)  # the simulated RED detector matches the real one
    assert len(res["texts"]) == 4 and all(corpus.held_out[t] for t in res["texts"])
    describe_req, sim_req = server.requests
    for r in (describe_req, sim_req):
        assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sekret"
        assert r["body"]["model"] == "test-model" and r["body"]["temperature"] == 0.0
        assert [m["role"] for m in r["body"]["messages"]] == ["system", "user"]
    assert "[[RED]] 3 BLUE 9" in describe_req["body"]["messages"][1]["content"]


@pytest.mark.parametrize("mode, match", [("slow", "no answer within 0.3 s"), ("500", "answered HTTP 500: internal error"),
                                         ("badjson", "not chat-completion JSON")])
def test_llm_errors_are_one_line(server, mode, match):
    server.mode = mode
    ep = LLMEndpoint(url=server.url, model="m", timeout_s=0.3)
    with pytest.raises(LLMError, match=match) as err:
        chat(ep, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value) and isinstance(err.value, UserError)


def test_llm_bad_simulation_and_env(server, monkeypatch):
    ep = LLMEndpoint(url=server.url, model="m", timeout_s=5)
    assert simulate(ep, "d", [["a", "RED"], ["RED"]]) == [[0.0, 10.0], [10.0]]
    server.mode = "short"
    with pytest.raises(LLMError, match="text 0: expected 2 numbers"):
        simulate(ep, "d", [["a", "RED"], ["RED"]])
    monkeypatch.delenv("MECHRL_LLM_URL", raising=False)
    assert LLMEndpoint.from_env() is None
    monkeypatch.setenv("MECHRL_LLM_URL", server.url)
    monkeypatch.delenv("MECHRL_LLM_MODEL", raising=False)
    with pytest.raises(LLMError, match="MECHRL_LLM_MODEL"):
        LLMEndpoint.from_env()
    monkeypatch.setenv("MECHRL_LLM_MODEL", "m")
    monkeypatch.setenv("MECHRL_LLM_API_KEY", "k")
    assert LLMEndpoint.from_env() == LLMEndpoint(url=server.url, model="m", api_key="k", timeout_s=60.0)
