"""Per-token surprisal of a text from an LLM endpoint: the client behind the surprisal metrics.

Two routes: the prompt echoed with its log-probabilities (``/v1/completions`` with ``echo``,
through the ``openai`` client), or, on llama.cpp's own server, each token forced as the next
one (its native ``/tokenize`` and ``/completion``, through ``http.py``). What the numbers mean,
how each route works and what it costs: docs/prompt-metrics.md.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from fedtextgrad_core.errors import ConfigError, LLMError, TransientLLMError
from fedtextgrad_core.llm.endpoint import EndpointSettings
from fedtextgrad_core.llm.http import RouteUnsupported, post_json
from fedtextgrad_core.llm.openai_transport import api_key_for, classify, shared_client
from fedtextgrad_core.llm.server_kind import probe_kind

log = logging.getLogger(__name__)

_LN2 = math.log(2.0)

ECHO_LOGPROBS = "echo-logprobs"
FORCED_NEXT_TOKEN = "forced-next-token"
METHODS = ("auto", ECHO_LOGPROBS, FORCED_NEXT_TOKEN)
# Scored tokens per prompt: the forced route costs one request per token (seconds for a few
# hundred tokens on a small CPU model), and merged prompts may run to a few thousand tokens.
DEFAULT_MAX_TOKENS = 512
# Added by llama.cpp to the forced token's logit. A small model's logits span a few tens, so
# +100 makes that token the one "generated"; its reported probability is computed before the bias.
FORCE_BIAS = 100.0
# How far (nats) a forced token's log-probability may sit from its unforced one. The prompt
# cache evaluates a token in a batch of another size than a fresh prompt would, which moves the
# last digits only; a bias that leaked into the number would move it by whole nats.
FORCE_TOLERANCE_NATS = 0.05


@dataclass(frozen=True)
class TokenSurprisal:
    """What the endpoint said about one text."""

    tokens: int  # tokens of the text as the endpoint split it (the echo route may count a BOS the server adds)
    bits: list[float]  # -log2 p(token | tokens before it) of each scored token, at most max_tokens of them
    method: str = ECHO_LOGPROBS  # the route that measured them


# Texts sent before the prompt to put a BOS token in front of it on a server that scores
# echoed prompts one token off (llama-cpp-python with a model that adds no BOS). Each is
# tried once per such endpoint, and kept only if the probe then comes back aligned and
# the BOS was stripped (the echoed tokens spell exactly the probe text).
BOS_CANDIDATES = ("<|im_start|>", "<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>")
# A text whose next tokens any LM predicts well: used to tell aligned from shifted scores,
# and as the context of the forced route's check.
ALIGNMENT_PROBE = "1, 2, 3, 4, 5, 6"
PROBE_TIMEOUT_SECONDS = 2.0


class _Unsupported(Exception):
    """This endpoint cannot give prompt log-probabilities this way (a lasting condition)."""


@dataclass
class _EndpointState:
    lock: threading.Lock
    method: str | None = None  # the route that works here; None: not chosen yet
    prefix: str | None = None  # echo route: text sent before each prompt; None: not probed yet
    unsupported: str = ""  # why no route works, once known
    warned: set[str] = field(default_factory=set)  # "unsupported" / "failed": each logged once


_endpoints: dict[tuple[str, str, str], _EndpointState] = {}
_endpoints_lock = threading.Lock()


def _state(key: tuple[str, str, str]) -> _EndpointState:
    with _endpoints_lock:
        return _endpoints.setdefault(key, _EndpointState(threading.Lock()))


def forget_endpoints() -> None:
    """Drop what this process learned about endpoints (routes, probes, warnings): for tests."""
    with _endpoints_lock:
        _endpoints.clear()


def _server_root(base_url: str) -> str:
    """llama.cpp's native routes (/tokenize, /completion) live at the server root, not under /v1."""
    return (base_url or "").rstrip("/").removesuffix("/v1")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _added_before(with_special: list[int], plain: list[int]) -> list[int]:
    """The tokens a server puts before every text (its BOS), from the text tokenized with and without them.

    Found as what precedes ``plain`` inside ``with_special`` (an EOS some models append is
    ignored); nothing when the two do not line up, so a doubtful BOS is never scored after.
    """
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


def _top_logprobs(entry: dict[str, Any]) -> list[tuple[int, float]]:
    """(token id, log-probability) of llama.cpp's ``top_logprobs`` list, best first; malformed items skipped."""
    tops = entry.get("top_logprobs")
    if not isinstance(tops, list):
        return []
    return [(item["id"], float(item["logprob"])) for item in tops
            if isinstance(item, dict) and isinstance(item.get("id"), int) and _finite(item.get("logprob"))]


class SurprisalClient:
    """Per-token surprisal of a text from an OpenAI-compatible endpoint, by one of two routes.

    ``method``: ``"auto"`` (default) uses the forced route on a server that
    ``server_kind.probe_kind`` (or ``server_kind``, when given) says is llama.cpp and the echo
    route elsewhere, and switches to the other route once if the first cannot work on that
    endpoint; ``"echo-logprobs"`` or ``"forced-next-token"`` uses only that one. The route
    that works is found once per endpoint per process (a few requests) and then kept.

    Echo route: one request per text, ``completions.create(prompt=text, echo=True,
    logprobs=1, max_tokens=1, temperature=0)``; the echoed prompt tokens carry their
    log-probabilities (the one generated token is dropped). ``max_tokens=1`` rather than 0:
    llama-cpp-python reads 0 as "no limit". ``bos_text``: ``None`` (default) probes the
    endpoint once per process for the one-token shift described in docs/prompt-metrics.md and
    fixes it with a BOS token from :data:`BOS_CANDIDATES`; ``""`` trusts the endpoint's
    alignment as it is; any other string is put in front of every text as the model's BOS.

    Forced route (llama.cpp's own server): ``/tokenize``, then one ``/completion`` per
    scored token, one after another, as docs/prompt-metrics.md describes; before the first text
    it checks on a short probe that ``logit_bias`` really forces the token and that the
    reported log-probability is the unforced one.

    ``max_tokens`` (default :data:`DEFAULT_MAX_TOKENS`; ``None``: no limit) caps how many
    tokens of a text are scored, on both routes; ``timeout`` bounds each HTTP request.

    An endpoint that cannot give log-probabilities by either route (HTTP errors, no
    ``logprobs`` in the answer, no echo and no ``/tokenize``, a shift that cannot be fixed,
    the sim backend) costs one warning per endpoint per process; :meth:`surprisal` then
    returns ``None`` without asking again. Passing errors (timeouts, 5xx, one token that
    cannot be forced) return ``None`` for that text only.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "", timeout: float = 120.0,
                 bos_text: str | None = None, *, key_setting: str = "server-api-key-env",
                 unsupported: str = "", method: str = "auto", max_tokens: int | None = DEFAULT_MAX_TOKENS,
                 server_kind: str = "auto"):
        if method not in METHODS:
            raise ConfigError("surprisal method", method, "one of " + ", ".join(METHODS))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ConfigError("surprisal max_tokens", max_tokens, "a whole number of at least 1, or None for no limit")
        self.base_url, self.model, self.bos_text = base_url, model, bos_text
        self.method, self.max_tokens, self.timeout, self.server_kind = method, max_tokens, timeout, server_kind
        self.endpoint = f"{model} at {base_url}" if base_url else model
        self._root = _server_root(base_url)
        self._state = _state((base_url, model, method))
        if unsupported and not self._state.unsupported:
            self._state.unsupported = unsupported
        self._client = None
        self._api_key = ""
        if not self._state.unsupported:
            self._api_key = api_key_for(api_key_env, key_setting)
            self._client = shared_client(base_url, self._api_key)

    @classmethod
    def from_endpoint(cls, settings: EndpointSettings, key_setting: str = "server-api-key-env",
                      bos_text: str | None = None) -> SurprisalClient:
        """A client for an ``EndpointSettings``; the sim backend gives one that has no surprisal."""
        if settings.backend != "openai" or not settings.base_url:
            return cls("", settings.describe(), key_setting=key_setting,
                       unsupported="it is not an OpenAI-compatible completions endpoint")
        return cls(settings.base_url, settings.model, settings.api_key_env,
                   timeout=max(settings.timeout, 120.0), bos_text=bos_text, key_setting=key_setting,
                   server_kind=getattr(settings, "server_kind", "auto") or "auto")

    @property
    def tokenizer(self) -> str:
        return f"endpoint:{self.model}"

    # -- public

    def surprisal(self, text: str) -> list[float] | None:
        """Surprisal in bits of every scored token, or ``None`` (see the class doc)."""
        measured = self.measure(text)
        return measured.bits if measured is not None else None

    def measure(self, text: str) -> TokenSurprisal | None:
        """Token count and per-token surprisal of ``text``, or ``None``."""
        if not text:
            return None
        if self._state.unsupported:
            self._warn_once()
            return None
        try:
            return self._score(text, self._route())
        except _Unsupported as exc:
            self._state.unsupported = str(exc)
            self._warn_once()
            return None
        except LLMError as exc:  # a passing failure: no surprisal for this text only
            self._warn_once(reason=str(exc))
            return None

    # -- choosing a route

    def _route(self) -> str:
        """The route for this endpoint: chosen and checked by the first caller, then kept."""
        state = self._state
        with state.lock:
            if state.method is None:
                state.method = self._choose_route()
            return state.method

    def _choose_route(self) -> str:
        if self.method != "auto":
            self._prepare(self.method)
            return self.method
        first = FORCED_NEXT_TOKEN if self._is_llamacpp() else ECHO_LOGPROBS
        second = ECHO_LOGPROBS if first == FORCED_NEXT_TOKEN else FORCED_NEXT_TOKEN
        try:
            self._prepare(first)
            return first
        except _Unsupported as first_failure:
            try:
                self._prepare(second)
            except (_Unsupported, LLMError) as second_failure:
                raise _Unsupported(f"{first}: {first_failure}; {second}: {second_failure}") from first_failure
            log.info("%s: the %s route does not work here (%s); measuring surprisal by the %s route",
                     self.endpoint, first, first_failure, second)
            return second

    def _is_llamacpp(self) -> bool:
        """llama.cpp's own server, which needs the forced route: from the settings, or asked (a few GETs)."""
        if self.server_kind not in ("", "auto"):
            return self.server_kind == "llama.cpp"
        return probe_kind(self.base_url, self._api_key, timeout=min(self.timeout, PROBE_TIMEOUT_SECONDS)) == "llama.cpp"

    def _prepare(self, method: str) -> None:
        """Check that ``method`` works on this endpoint (raises ``_Unsupported`` if it cannot)."""
        if method == FORCED_NEXT_TOKEN:
            self._check_forcing()
        elif self.bos_text is None:
            if self._state.prefix is None:
                self._state.prefix = self._find_prefix()
        else:
            self._request(self.bos_text + ALIGNMENT_PROBE)  # fails here when this endpoint cannot echo

    # -- scoring

    def _score(self, text: str, method: str) -> TokenSurprisal:
        if method == FORCED_NEXT_TOKEN:
            return self._score_forced(text)
        prefix = self.bos_text if self.bos_text is not None else (self._state.prefix or "")
        _, values, _ = self._request(prefix + text)
        bits = [-float(v) / _LN2 for v in values if v is not None]
        if self.max_tokens is not None:
            bits = bits[: self.max_tokens]
        return TokenSurprisal(tokens=len(values), bits=bits, method=ECHO_LOGPROBS)

    def _score_forced(self, text: str) -> TokenSurprisal:
        """Each token scored given the ids before it: one forced one-token completion per token."""
        plain = self._tokenize(text, add_special=False)
        lead = _added_before(self._tokenize(text, add_special=True), plain)
        skip = 0 if lead else 1  # a first token with nothing before it has no next-token surprisal
        targets = plain[skip:]
        if self.max_tokens is not None:
            targets = targets[: self.max_tokens]
        sequence = lead + plain
        start = len(lead) + skip
        bits = [-self._forced_logprob(sequence[: start + k], target) / _LN2 for k, target in enumerate(targets)]
        return TokenSurprisal(tokens=len(plain), bits=bits, method=FORCED_NEXT_TOKEN)

    def _forced_logprob(self, context: list[int], target: int) -> float:
        """log p(target | context) in nats: ``target`` forced by logit_bias, its unbiased probability read back."""
        entry = self._complete(context, n_probs=1, force=target)
        if entry["id"] != target:
            raise LLMError(f"{self.endpoint} generated token {entry['id']} where a logit_bias of +{FORCE_BIAS:g} "
                           f"should have forced token {target}: that token is too unlikely to force, so this prompt "
                           f"gets no surprisal")
        logprob = entry["logprob"]
        if not _finite(logprob):
            raise LLMError(f"{self.endpoint} gave no finite log-probability for token {target} (got {logprob!r})")
        tops = _top_logprobs(entry)
        if tops and float(logprob) > tops[0][1] + FORCE_TOLERANCE_NATS:
            raise _Unsupported("it reported a token forced by logit_bias as more likely than the model's own first "
                               "choice, so its probabilities include the bias")
        return float(logprob)

    def _check_forcing(self) -> None:
        """Once per endpoint: the bias must force the token, and the reported log-probability must be unbiased.

        On a short probe, the model's second choice is forced; it must come back as the token
        generated, with the log-probability the unforced request listed for it. A server that
        reported probabilities after the bias would make every token look certain.
        """
        probe = self._tokenize(ALIGNMENT_PROBE, add_special=True)
        if len(probe) < 2:
            raise _Unsupported(f"POST /tokenize split {ALIGNMENT_PROBE!r} into fewer than two tokens")
        context = probe[:-1]
        unforced = _top_logprobs(self._complete(context, n_probs=2, force=None))
        if len(unforced) < 2:
            raise _Unsupported("POST /completion with n_probs 2 listed fewer than two top_logprobs")
        second, expected = unforced[1]
        forced = self._complete(context, n_probs=2, force=second)
        if forced["id"] != second:
            raise _Unsupported(f"a logit_bias of +{FORCE_BIAS:g} did not force a token (asked for token {second}, "
                               f"got {forced['id']})")
        got = forced["logprob"]
        if not _finite(got) or abs(float(got) - expected) > FORCE_TOLERANCE_NATS:
            raise _Unsupported(f"the log-probability it reported for a token forced by logit_bias ({got!r}) is not "
                               f"the unforced one ({expected:.4f}), so its probabilities include the bias")

    # -- llama.cpp's native HTTP API

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds what the model puts before every text (its BOS), if anything."""
        answer = self._post("/tokenize", {"content": text, "add_special": add_special})
        tokens = answer.get("tokens")
        if not isinstance(tokens, list) or not _token_ids(tokens):
            raise _Unsupported("POST /tokenize answered without a list of token ids in 'tokens'")
        return [int(token) for token in tokens]

    def _complete(self, context: list[int], n_probs: int, force: int | None) -> dict[str, Any]:
        """One token generated after ``context`` (token ids, no BOS added), ``force`` pushed by logit_bias.

        Returns ``completion_probabilities[0]``: the generated ``id``, its ``logprob`` and the
        ``top_logprobs``, all from the raw logits (``post_sampling_probs`` false).
        """
        body: dict[str, Any] = {"prompt": context, "n_predict": 1, "n_probs": n_probs, "temperature": 0.0,
                                "cache_prompt": True, "post_sampling_probs": False, "stream": False}
        if force is not None:
            body["logit_bias"] = [[force, FORCE_BIAS]]
        answer = self._post("/completion", body)
        probs = answer.get("completion_probabilities")
        entry = probs[0] if isinstance(probs, list) and probs else None
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "logprob" not in entry:
            raise _Unsupported("POST /completion answered without completion_probabilities[0] holding the generated "
                               "token's id and logprob (n_probs not supported?)")
        return entry

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to the server root; errors sorted like the echo route's (lasting, passing, per text)."""
        where = f"POST {path} at {self._root}"
        try:
            answer, _ = post_json(self._root + path, body, api_key=self._api_key, timeout=self.timeout, where=where)
        except RouteUnsupported as exc:  # the route does not exist: not llama.cpp's server
            raise _Unsupported(str(exc)) from exc
        if not isinstance(answer, dict):
            raise LLMError(f"{where} answered with JSON that is not an object: {str(answer)[:120]}")
        return answer

    # -- the echo route

    def _warn_once(self, reason: str = "") -> None:
        """One warning per endpoint that cannot score at all, one more if a call fails in passing."""
        kind = "failed" if reason else "unsupported"
        with _endpoints_lock:
            if kind in self._state.warned:
                return
            self._state.warned.add(kind)
        if reason:
            log.warning("%s gave no token log-probabilities for a prompt (%s); its surprisal fields are left "
                        "empty (further such failures are not logged)", self.endpoint, reason)
        else:
            log.warning("%s gives no token log-probabilities; surprisal fields are left empty (%s)",
                        self.endpoint, self._state.unsupported)

    def _request(self, prompt: str) -> tuple[list[str], list[Any], list[Any]]:
        assert self._client is not None  # built in __init__ for every endpoint that is asked
        try:
            response = self._client.completions.create(
                model=self.model, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0, timeout=self.timeout)
        except Exception as exc:
            error = classify(exc, self.base_url, self.model)
            if "logits_all" in str(error):  # llama-cpp-python answers HTTP 500 for this lasting condition
                raise _Unsupported(f"{error}; start llama-cpp-python's server with --logits_all true") from exc
            if isinstance(error, TransientLLMError):
                raise error from exc
            raise _Unsupported(f"POST /completions with echo and logprobs failed: {error}") from exc
        choices = getattr(response, "choices", None) if not isinstance(response, str) else None
        logprobs = getattr(choices[0], "logprobs", None) if choices else None
        if logprobs is None or not getattr(logprobs, "token_logprobs", None):
            raise _Unsupported("the completions answer has no logprobs of prompt tokens")
        usage = getattr(response, "usage", None)
        completion = getattr(usage, "completion_tokens", None) or 0
        tokens = list(getattr(logprobs, "tokens", None) or [])
        values = list(logprobs.token_logprobs)
        tops = list(getattr(logprobs, "top_logprobs", None) or [None] * len(values))
        keep = max(0, len(values) - completion)  # the echoed prompt; the generated token goes
        if keep == 0:
            raise _Unsupported("the answer does not echo the prompt's tokens")
        return tokens[:keep], values[:keep], tops[:keep]

    def _find_prefix(self) -> str:
        if self._alignment(ALIGNMENT_PROBE, "") != "shifted":
            return ""
        for candidate in BOS_CANDIDATES:
            try:
                verdict = self._alignment(ALIGNMENT_PROBE, candidate)
            except _Unsupported:
                continue
            if verdict == "aligned":
                log.info("%s scores echoed prompts one token off; sending each text behind %r (BOS) fixes it",
                         self.endpoint, candidate)
                return candidate
        raise _Unsupported("it scores echoed prompt tokens one token off (llama-cpp-python with a model that "
                           "adds no BOS token?) and no BOS text fixed that; pass bos_text")

    def _alignment(self, probe: str, prefix: str) -> str:
        """'aligned', 'shifted' or 'unclear': whose next token the top-1 guesses match."""
        tokens, _, tops = self._request(prefix + probe)
        if prefix and "".join(tokens) != probe:
            return "unclear"  # the prefix was not consumed as a BOS token
        same = following = 0
        for i in range(1, len(tokens) - 1):
            top = tops[i] if i < len(tops) else None
            if not top:
                continue
            guess = max(top.items(), key=lambda item: item[1])[0]
            same += guess == tokens[i]
            following += guess == tokens[i + 1]
        if following > same and following >= 2:
            return "shifted"
        return "aligned" if same > following else "unclear"
