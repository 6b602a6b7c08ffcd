"""Optional written descriptions of latents from an LLM behind an OpenAI-compatible chat endpoint, scored like the
offline explanation (`describe.py`): by how well activations predicted from the description correlate with the
real ones on held-out texts.

The endpoint is the user's: `MECHRL_LLM_URL` (the API base, e.g. `http://localhost:8000/v1`; requests go to
`<url>/chat/completions`), `MECHRL_LLM_MODEL`, and the key from `MECHRL_LLM_API_KEY` (sent as a Bearer token; may
be unset for local servers). Without a URL nothing here runs and every other description still works. Plain
`urllib`: one POST per call with a timeout; a timeout, a non-200 answer or an answer that is not chat-completion
JSON raises `LLMError` with a one-line message.

Two calls per latent, as in automated interpretability (Bills et al. 2023), simplified:

    describe   the top-activating contexts (activating tokens marked) -> a one-sentence description
    simulate   the description and held-out texts as token lists -> a predicted activation 0-10 per token, as JSON
               {"activations": [[...], ...]}; score = Pearson correlation with the real activations
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechrl.analysis.describe import TokenCorpus, pearson
from mechrl.errors import UserError

ENV_URL, ENV_MODEL, ENV_KEY = "MECHRL_LLM_URL", "MECHRL_LLM_MODEL", "MECHRL_LLM_API_KEY"


class LLMError(UserError, RuntimeError):
    """The LLM endpoint failed: no answer in time, a non-200 status, or an answer that is not chat JSON."""


@dataclass(frozen=True)
class LLMEndpoint:
    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls, timeout_s: float = 60.0) -> "LLMEndpoint | None":
        """The endpoint the environment configures, or None when `MECHRL_LLM_URL` is unset."""
        url = os.environ.get(ENV_URL)
        if not url:
            return None
        model = os.environ.get(ENV_MODEL)
        if not model:
            raise LLMError(f"{ENV_URL} is set but {ENV_MODEL} is not: name the model to ask")
        return cls(url=url, model=model, api_key=os.environ.get(ENV_KEY) or None, timeout_s=timeout_s)


def _one_line(s: str, n: int = 200) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[:n] + "..."


def chat(endpoint: LLMEndpoint, messages: Sequence[dict], *, temperature: float = 0.0) -> str:
    """POST one chat completion and return the first choice's message content."""
    url = endpoint.url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": endpoint.model, "messages": list(messages), "temperature": temperature}).encode()
    headers = {"Content-Type": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=endpoint.timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace") if e.fp is not None else ""
        raise LLMError(f"LLM endpoint {url} answered HTTP {e.code}: {_one_line(detail)}") from None
    except (TimeoutError, socket.timeout):
        raise LLMError(f"LLM endpoint {url}: no answer within {endpoint.timeout_s:g} s") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise LLMError(f"LLM endpoint {url}: no answer within {endpoint.timeout_s:g} s") from None
        raise LLMError(f"LLM endpoint {url} unreachable: {_one_line(e.reason)}") from None
    if status != 200:
        raise LLMError(f"LLM endpoint {url} answered HTTP {status}: {_one_line(raw.decode('utf-8', 'replace'))}")
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LLMError(f"LLM endpoint {url}: the answer is not chat-completion JSON: "
                       f"{_one_line(raw.decode('utf-8', 'replace'))}") from None
    if not isinstance(content, str):
        raise LLMError(f"LLM endpoint {url}: message content is {type(content).__name__}, not text")
    return content


DESCRIBE_SYSTEM = ("You explain features of a neural network. You see text snippets where one feature fires; the "
                   "token where it fires most is marked [[like this]], other tokens where it fires [like this]. "
                   "Answer with one short sentence saying what the feature detects.")
SIMULATE_SYSTEM = ("You predict where a neural network feature fires. Given its description and some texts as "
                   "lists of tokens, answer only JSON {\"activations\": [[...], ...]}: for each text a list with one "
                   "number from 0 (silent) to 10 (strongest) per token, in order.")


def describe(endpoint: LLMEndpoint, contexts: Sequence[str]) -> str:
    """A one-sentence description from the marked top-activating contexts."""
    if not contexts:
        raise ValueError("describe: no contexts (the latent never fires)")
    user = "Snippets:\n" + "\n".join(f"{i + 1}. {c}" for i, c in enumerate(contexts))
    return chat(endpoint, [{"role": "system", "content": DESCRIBE_SYSTEM}, {"role": "user", "content": user}]).strip()


def simulate(endpoint: LLMEndpoint, description: str, texts: Sequence[Sequence[str]]) -> list[list[float]]:
    """Predicted activations (one list per text, one number per token) from the description."""
    user = json.dumps({"description": description, "texts": [list(t) for t in texts]})
    content = chat(endpoint, [{"role": "system", "content": SIMULATE_SYSTEM}, {"role": "user", "content": user}])
    try:
        acts = json.loads(content)["activations"]
    except (ValueError, KeyError, TypeError):
        raise LLMError(f"LLM simulation is not JSON with 'activations': {_one_line(content)}") from None
    if not isinstance(acts, list) or len(acts) != len(texts):
        raise LLMError(f"LLM simulation gave {len(acts) if isinstance(acts, list) else 'no'} lists for {len(texts)} texts")
    for i, (a, t) in enumerate(zip(acts, texts)):
        if not isinstance(a, list) or len(a) != len(t) or not all(isinstance(v, (int, float)) for v in a):
            raise LLMError(f"LLM simulation for text {i}: expected {len(t)} numbers, got {_one_line(json.dumps(a), 80)}")
    return [[float(v) for v in a] for a in acts]


def describe_and_score(endpoint: LLMEndpoint, acts: torch.Tensor, corpus: TokenCorpus, contexts: Sequence[str], *,
                       n_texts: int = 8) -> dict:
    """Describe a latent from its contexts, simulate it on held-out texts (half its top-activating ones, half the
    first others) and score the simulation by Pearson correlation with the real activations over their tokens."""
    description = describe(endpoint, contexts)
    held = corpus.held_out.nonzero().flatten().tolist()
    peak = {t: float(acts[corpus.example == t].max()) for t in held}
    by_peak = sorted(held, key=lambda t: -peak[t])
    chosen = by_peak[:n_texts // 2]
    chosen += [t for t in held if t not in chosen][:n_texts - len(chosen)]
    pred = simulate(endpoint, description, [corpus.tokens[t] for t in chosen])
    real = torch.cat([acts[int(corpus.offsets[t]):int(corpus.offsets[t]) + len(corpus.tokens[t])] for t in chosen])
    score = pearson(torch.tensor([v for p in pred for v in p]), real)
    return {"description": description, "score": score, "texts": chosen,
            **({"undefined": "the prediction or the real activation is constant on these texts"} if score is None else {})}
