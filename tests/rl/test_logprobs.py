"""rl/logprobs.py: log-probs, entropies and KLs computed a chunk of positions at a time equal the
ones from whole logits (values and gradients), never hold more than a chunk of full-vocabulary
tensors, and are what PPO and eval actually run.

The references below are the code posttrain ran before chunking: model(...).logits, then
core.logprobs_from_logits / core.entropy_from_logits / cross_entropy / metrics.kl_per_sequence.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from posttrain import memory
from posttrain.rl import core, logprobs, rollout

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"rtol": 1e-5, "atol": 1e-6}


class _Created(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view allocates nothing (the transposed LM head weight [hidden, V] is one)
            for t in tree_flatten(out)[0]:
                self.record(t, func.__name__.split(".")[0])
        return out


class VocabTensors:
    """Watches the tensors whose last dimension is the vocabulary (logits, log-probs, their exp,
    their gradients), forward and backward: `peak`, the largest one any op creates, and `saved`,
    the elements of those kept for backward. Together they bound what is alive at once: a chunk's
    temporaries, plus what autograd keeps (nothing, when each chunk is checkpointed; every chunk's
    log-probs, were they not)."""

    def __init__(self, vocab: int):
        self.vocab, self.peak, self.saved, self.ops = vocab, 0, 0, set()
        self._modes = [_Created(self._created), torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)]

    def _wide(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] == self.vocab

    def _created(self, t, op: str) -> None:
        if self._wide(t):
            self.peak = max(self.peak, t.numel())
            self.ops.add(op)

    def _pack(self, t):
        if self._wide(t):
            self.saved += t.numel()
        return t

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


@pytest.fixture(scope="module")
def policy(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def value(tiny_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the score head is freshly initialised
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, dtype=torch.float32).eval()
    return rollout.ValueModel(model)


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _batch(vocab: int, pad_id: int = 0) -> rollout.Batch:
    """3 left-padded queries of up to 5 tokens and right-padded responses of up to 7."""
    g = torch.Generator().manual_seed(0)
    q, qm = rollout.left_pad([torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 2, 4)], pad_id)
    r = torch.randint(3, vocab, (3, 7), generator=g)
    m = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2])
    return rollout.Batch(q, qm, torch.where(m.bool(), r, torch.full_like(r, pad_id)), m,
                         torch.tensor([False, True, True]))


def _ptx(vocab: int):
    """2 right-padded conversations with labels on some tokens only (-100 elsewhere)."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, taught in ((9, range(4, 9)), (6, range(2, 5))):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append((ids, [t if k in taught else -100 for k, t in enumerate(ids)]))
    return rollout.right_pad_sft(examples, pad_id=0)


def _full_forward(model: rollout.PolicyAndValue, batch, temperature, ptx):
    """PolicyAndValue.forward as it was before chunking: the whole logits of every position (the
    entropy without gradients only, as the rollout computes it)."""
    logits = model.policy(**rollout._inputs(batch)).logits[:, batch.queries.shape[1] - 1: -1]
    logp = core.logprobs_from_logits(logits, batch.responses, temperature)
    entropy = None if torch.is_grad_enabled() else core.entropy_from_logits(logits, temperature)
    ids, attn, labels = ptx
    ptx_logits = model.policy(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    ptx_loss = torch.nn.functional.cross_entropy(ptx_logits.float().flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
    return logp, entropy, model.value(batch), ptx_loss


def _loss_and_grads(model, outputs, batch):
    """A loss that uses every output with gradients, and the gradient of every trained parameter."""
    logp, entropy, values, ptx_loss = outputs
    assert entropy is None  # the update's forward computes no entropy (no loss uses it)
    w = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape) * batch.mask
    loss = (logp * w).sum() + (values * batch.mask).sum() + 0.5 * ptx_loss
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# the LM head applied to hidden states is the model's forward


def test_hidden_states_and_logits_function_are_the_models_logits(policy):
    ids = torch.randint(3, _vocab(policy), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        got = logprobs.logits_function(policy)(logprobs.hidden_states(policy, input_ids=ids))
    assert_close(got, want, **TOL)


def test_gemma3_soft_capping_is_applied():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              final_logit_softcapping=0.2, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = logprobs.logits_function(model)(logprobs.hidden_states(model, input_ids=ids))
        uncapped = model.get_output_embeddings()(logprobs.hidden_states(model, input_ids=ids))
    assert want.abs().max() <= 0.2 and (uncapped - want).abs().max() > 0.05  # the cap matters here
    assert_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------
# same numbers and gradients as whole logits


@pytest.mark.parametrize("chunk", [1, 3, 7, 0])
def test_chunked_logprobs_and_entropy_equal_whole_logits(policy, chunk):
    ids = torch.randint(3, _vocab(policy), (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[:, :-1]
        hidden = logprobs.hidden_states(policy, input_ids=ids)[:, :-1]
        logp, entropy = logprobs.token_logprobs(policy, hidden, ids[:, 1:], 0.7, entropy=True, chunk=chunk)
    assert_close(logp, core.logprobs_from_logits(logits, ids[:, 1:], 0.7), **TOL)
    assert_close(entropy, core.entropy_from_logits(logits, 0.7), **TOL)


@pytest.mark.parametrize("chunk", [1, 4, 0])
def test_policy_and_value_forward_and_gradients_equal_whole_logits(policy, value, chunk, monkeypatch):
    """The PPO update's forward (log-probs, values, the ptx loss) and the gradient of a loss using
    all of them, chunked, equal the unchunked computation; so does the rollout's (no gradients),
    which adds the entropy."""
    monkeypatch.setattr(memory, "CHUNK_TOKENS", chunk)
    model = rollout.PolicyAndValue(copy.deepcopy(policy), copy.deepcopy(value))
    batch, ptx = _batch(_vocab(policy)), _ptx(_vocab(policy))
    with torch.no_grad():
        want, got = _full_forward(model, batch, 0.7, ptx), model(batch, 0.7, ptx)
    assert got[1] is not None
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, **TOL)
    want = _full_forward(model, batch, 0.7, ptx)
    loss_w, grads_w = _loss_and_grads(model, want, batch)
    loss_g, grads_g = _loss_and_grads(model, model(batch, 0.7, ptx), batch)
    assert_close(loss_g, loss_w, **TOL)
    assert grads_g.keys() == grads_w.keys() and any("lm_head" in n or "embed" in n for n in grads_g)
    for name in grads_w:
        assert_close(grads_g[name], grads_w[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_chunked_equals_whole_logits(policy):
    model = copy.deepcopy(policy).to(torch.bfloat16)
    batch = _batch(_vocab(policy))
    with torch.no_grad():
        logits = model(**rollout._inputs(batch)).logits[:, batch.queries.shape[1] - 1: -1]
        want = core.logprobs_from_logits(logits, batch.responses), core.entropy_from_logits(logits)
        got = logprobs.token_logprobs(model, rollout.response_hidden(model, batch), batch.responses, entropy=True,
                                      chunk=2)
    for g, w in zip(got, want, strict=True):  # the same bf16 logits, upcast: equal up to fp32 rounding
        assert g.dtype == torch.float32
        assert_close(g, w, **TOL)


def test_no_position_and_empty_ptx_behave_like_cross_entropy(policy):
    """No taught token in the ptx batch: NaN, as cross_entropy with every label ignored gives (PPO
    stops on it); and no position at all gives empty results."""
    ids, _, labels = _ptx(_vocab(policy))
    with torch.no_grad():
        hidden = logprobs.hidden_states(policy, input_ids=ids)
        logp, entropy = logprobs.token_logprobs(policy, hidden[:, :0], ids[:, :0], entropy=True)
    assert logp.shape == entropy.shape == (ids.shape[0], 0)
    empty = torch.full_like(labels, -100)
    taught = empty[:, 1:] != -100
    loss = -logprobs.token_logprobs(policy, hidden[:, :-1][taught], empty[:, 1:][taught])[0].mean()
    assert torch.isnan(loss)


# ---------------------------------------------------------------------------------------------
# the bound: no tensor with the vocabulary as its last dimension beyond chunk × vocabulary


def test_recorder_sees_whole_logits(policy, value):
    """The check below can fail: the unchunked computation creates [B, T, V] tensors."""
    model = rollout.PolicyAndValue(copy.deepcopy(policy), copy.deepcopy(value))
    batch, ptx = _batch(_vocab(policy)), _ptx(_vocab(policy))
    with VocabTensors(_vocab(policy)) as seen:
        _loss_and_grads(model, _full_forward(model, batch, 1.0, ptx), batch)
    assert seen.peak >= batch.responses.numel() * _vocab(policy) > 4 * _vocab(policy)
    assert seen.saved >= batch.responses.numel() * _vocab(policy)


def test_ppo_forward_and_backward_hold_at_most_a_chunk_of_vocabulary(policy, value, monkeypatch):
    chunk = 4
    monkeypatch.setattr(memory, "CHUNK_TOKENS", chunk)
    model = rollout.PolicyAndValue(copy.deepcopy(policy), copy.deepcopy(value))
    batch, ptx = _batch(_vocab(policy)), _ptx(_vocab(policy))
    with VocabTensors(_vocab(policy)) as seen:
        _loss_and_grads(model, model(batch, 1.0, ptx), batch)
        with torch.no_grad():
            rollout.response_logprobs(policy, batch, 1.0)
    assert 0 < seen.peak <= chunk * _vocab(policy) and seen.saved == 0
    assert "_log_softmax_backward_data" in seen.ops  # backward (recomputing each chunk) was recorded too


# ---------------------------------------------------------------------------------------------
# wiring: a whole PPO iteration and the eval metrics run chunked


def _ppo_loop(tiny_dir, make_config, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from posttrain import demo, models
    from posttrain.sections import PPOStageConfig
    from posttrain.stages import ppo

    cfg = make_config()
    tok = models.load_tokenizer(cfg, str(tiny_dir))
    pc = PPOStageConfig(batch_size=4, mini_batch_size=2, max_new_tokens=6, ptx_coef=0.5, ppo_epochs=1)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, dtype=torch.float32).eval()
    scorer.config.pad_token_id = tok.tokenizer.pad_token_id
    value = rollout.ValueModel(copy.deepcopy(scorer).requires_grad_(True))
    rows = demo.make_rows(seed=0)["sft_train"][:8]
    queries, _ = ppo._tokenize_prompts({"prompt": [r["messages"][:-1] for r in rows]}, tok.tokenizer, 64)
    ptx = rollout.sft_examples(tok.tokenizer, [r["messages"] for r in rows], 64)
    accelerator = Accelerator(cpu=True)
    model = rollout.PolicyAndValue(policy, value)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    return ppo.Loop(cfg, pc, accelerator, model, optimizer, reference, scorer, tok, queries, tmp_path, ptx)


def test_a_ppo_iteration_runs_chunked_with_the_same_numbers(tiny_dir, make_config, tmp_path, monkeypatch):
    """Loop.step (rollout log-probs, reference log-probs, the update with ptx) holds at most a chunk
    of vocabulary-wide tensors (generation's own [batch, V] included: chunk = batch size), and gives
    the numbers of the same step computed in one chunk."""
    runs = {}
    for chunk in (4, 0):
        monkeypatch.setattr(memory, "CHUNK_TOKENS", chunk)
        loop = _ppo_loop(tiny_dir, make_config, tmp_path / str(chunk))
        vocab = _vocab(loop.reference)
        torch.manual_seed(1)
        with VocabTensors(vocab) as seen:
            stats, samples = loop.step(0)
        policy = loop.acc.unwrap_model(loop.model).policy
        weights = {n: p.detach().clone() for n, p in policy.named_parameters()}
        runs[chunk] = stats, samples, (seen.peak, seen.saved), weights
    stats, samples, peak, params = runs[4]
    assert peak == (4 * vocab, 0)  # (largest, kept for backward); generation's own [4, V] is the largest
    assert runs[0][2][0] > 4 * vocab  # one chunk: the whole [micro-batch, tokens, V] appears
    assert samples == runs[0][1] and stats.keys() == runs[0][0].keys() and "ptx_loss" in stats
    for k, v in stats.items():
        assert v == pytest.approx(runs[0][0][k], rel=1e-4, abs=1e-6), k
    for n, p in params.items():
        # Adam divides by √v: a gradient near 0 differing in its last bits moves its weight
        # differently, so the weights agree to 1% of one step (lr 1e-3), not to fp32 rounding
        assert_close(p, runs[0][3][n], rtol=0, atol=1e-5, msg=n)


def test_rollout_forwards_run_a_micro_batch_at_a_time_with_the_same_numbers(tiny_dir, make_config, tmp_path,
                                                                            monkeypatch):
    """Issue 16 item 5: the rollout's no-grad forwards (policy and value, reference) and the reward
    model see at most the update's micro-batch of rows (mini_batch_size 2 here, of 4 sampled), and
    give the numbers of one forward over the whole batch."""
    from posttrain.rl import rewards

    loop = _ppo_loop(tiny_dir, make_config, tmp_path)
    unwrapped = loop.acc.unwrap_model(loop.model)
    rows: list[int] = []
    original = rollout.PolicyAndValue.forward

    def counted(self, batch, *args, **kwargs):
        if not torch.is_grad_enabled():
            rows.append(batch.responses.shape[0])
        return original(self, batch, *args, **kwargs)

    scored: list[int] = []
    score_ids = rewards.score_ids
    monkeypatch.setattr(rollout.PolicyAndValue, "forward", counted)
    monkeypatch.setattr(rewards, "score_ids", lambda *a, **k: scored.append(k["batch_size"]) or score_ids(*a, **k))
    torch.manual_seed(1)
    loop.step(0)
    assert rows == [2, 2] and scored == [2]
    torch.manual_seed(2)
    batch = rollout.sample(unwrapped.policy, *rollout.left_pad(loop.queries[:4], 0), eot_id=loop.tok.eot_id, pad_id=0,
                           temperature=1.0, top_p=1.0, max_new_tokens=6)
    with torch.no_grad():
        whole = loop.rollout_forwards(unwrapped, batch, 4)
        for n in (1, 3):
            for got, want in zip(loop.rollout_forwards(unwrapped, batch, n), whole, strict=True):
                assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_eval_kl_and_likelihoods_run_chunked(tiny_dir, make_config, policy, monkeypatch):
    from posttrain import demo, metrics, models
    from posttrain.stages import eval as eval_stage

    chunk = 2
    monkeypatch.setattr(memory, "CHUNK_TOKENS", chunk)
    tok = models.load_tokenizer(make_config(), str(tiny_dir))
    vocab = _vocab(policy)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    batch = _batch(vocab, tok.tokenizer.pad_token_id)
    gens = [{"query": q[k.bool()].tolist(), "ids": r[m.bool()].tolist(), "ended": bool(e)}
            for q, k, r, m, e in zip(batch.queries, batch.query_mask, batch.responses, batch.mask, batch.ended,
                                     strict=True)]
    convs = [r["messages"] for r in demo.make_rows(seed=0)["sft_eval"][:3]]
    with VocabTensors(vocab) as seen:
        kl = eval_stage.kl_to_reference(policy, ref, gens, tok, 8, "cpu")
        pairs = eval_stage._assistant_logps(policy, tok, convs, 8, "cpu")
    assert 0 < seen.peak <= chunk * vocab and seen.saved == 0

    with torch.no_grad():  # the unchunked computations
        inputs = rollout._inputs(batch)
        cut = slice(batch.queries.shape[1] - 1, -1)
        want_kl = metrics.kl_per_sequence(policy(**inputs).logits[:, cut], ref(**inputs).logits[:, cut], batch.mask)
        ids, attn, labels = rollout.right_pad_sft(rollout.sft_examples(tok.tokenizer, convs, 10**9),
                                                  tok.tokenizer.pad_token_id)
        logps = core.logprobs_from_logits(policy(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:])
        mask = (labels[:, 1:] != -100).float()
    assert min(want_kl) > 0
    assert kl == pytest.approx(want_kl, rel=1e-5)
    assert [n for _, n in pairs] == mask.sum(-1).long().tolist()
    assert [s for s, _ in pairs] == pytest.approx(metrics.masked_sums(logps, mask), rel=1e-5)


def test_a_model_that_transforms_its_logits_unknowingly_is_refused(tiny_dir):
    """check_head: an architecture whose forward changes its logits in a way logits_function does
    not reproduce stops with one line; the same model unchanged passes (the first call only)."""
    from transformers import AutoModelForCausalLM

    from posttrain.errors import PosttrainError

    ids = torch.tensor([[3, 5, 7, 9, 11]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    logprobs.hidden_states(plain, input_ids=ids)
    assert plain in logprobs._checked

    odd = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    forward = odd.forward

    def scaled(*args, **kwargs):  # e.g. remote code with its own logit scale
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.001 + 1e-3
        return out

    odd.forward = scaled
    with pytest.raises(PosttrainError, match="differ from its forward"):
        logprobs.hidden_states(odd, input_ids=ids)
    assert odd not in logprobs._checked
