"""Online RL pieces: rewards computed on the decoded reply text, group-relative advantages,
the rows the update learns from, and best-of-N reranking with a reward model."""

import ml_collections
import numpy as np
import pytest

from data_pipelines import chat_template, synthetic
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.modeling import decoding
from t5x_like.modeling import model
from t5x_like.serving import rerank
from t5x_like.training import rl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [synthetic.text_document(i) for i in range(300)]
    return tokenizer_lib.train(texts, str(tmp_path_factory.mktemp("tok") / "t.model"),
                               vocab_size=400)


QUESTION = [{"role": "user", "content": "What is 40 + 6?"}]


class ScriptedDecoder:
    """Stands in for decoding.Decoder: replies with fixed token ids, in order."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, prompts, sampling):
        self.calls.append((prompts, sampling))
        return [decoding.Completion(ids, self.tokenizer.decode(ids), "stop") for ids in self.replies]


def test_rewards_are_computed_on_the_decoded_text(tok):
    replies = [tok.encode(t) for t in ("46", "47", "It is 46.", "")]
    decoder = ScriptedDecoder(tok, replies)
    prompt = chat_template.prompt(tok, QUESTION)
    seen = []

    def reward_fn(messages, texts):
        seen.append((messages, texts))
        return rl.exact_answer_reward(messages, texts)

    completions, messages, rewards = rl.sample_and_score(
        decoder, tok, [prompt] * 4, reward_fn, [decoding.Sampling()] * 4)
    # The reward function saw the prompt as messages and the replies as text.
    assert seen[0][0] == [QUESTION] * 4
    assert seen[0][1] == ["46", "47", "It is 46.", ""]
    np.testing.assert_array_equal(rewards, [1, 0, 1, 0])


def test_group_advantages_are_relative_to_the_group():
    adv = rl.group_advantages([[1, 0, 0, 1], [1, 1, 1, 1]])
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], rtol=1e-3)
    np.testing.assert_array_equal(adv[1], [0, 0, 0, 0])  # all alike: nothing to learn


def test_reply_rows_learn_the_reply_and_its_end(tok):
    prompt = chat_template.prompt(tok, QUESTION)
    reply = tok.encode("46")
    stopped = decoding.Completion(reply, "46", "stop")
    cut = decoding.Completion(reply, "46", "length")
    rows = rl.reply_rows(tok, [prompt, prompt], [stopped, cut], max_len=32)
    end = tok.marker_ids[chat_template.END]
    w = rows["weights"] > 0
    assert rows["targets"][0][w[0]].tolist() == reply + [end]  # stopped: learns to stop there
    assert rows["targets"][1][w[1]].tolist() == reply  # cut at the length limit: no <|end|>
    n = len(prompt) + len(reply)
    assert rows["inputs"][0][:n].tolist() == (prompt + reply)[:n]
    assert rows["segment_ids"][1].sum() == n - 1


@pytest.fixture(scope="module")
def tiny_model(tok):
    cfg = ml_collections.FrozenConfigDict(dict(
        vocab_size=512, vocab_multiple=128, hidden_dim=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=64, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, dropout=0.0, dtype="float32", param_dtype="float32",
        scan_layers=True, remat="none"))
    graphdef, _, _ = model.abstract_model(cfg)
    return cfg, graphdef, model.init_params(cfg, seed=1)


def test_sampled_rewards_match_the_decoded_replies(tok, tiny_model):
    cfg, graphdef, params = tiny_model
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=8)
    prompt = chat_template.prompt(tok, QUESTION)
    sampling = [decoding.Sampling(max_new_tokens=4, temperature=1.0, seed=s) for s in range(8)]
    completions, _, rewards = rl.sample_and_score(decoder, tok, [prompt] * 8,
                                                  rl.exact_answer_reward, sampling)
    assert len({tuple(c.tokens) for c in completions}) > 1  # different seeds, different replies
    for c, r in zip(completions, rewards):
        assert c.text == tok.decode(c.tokens)
        assert r == float(synthetic.check_answer(QUESTION[0]["content"], c.text))


def test_best_of_n_keeps_the_reply_the_reward_model_prefers(tok, tiny_model):
    cfg, graphdef, params = tiny_model
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=16)

    class LongestReply:  # a reward model that prefers longer texts
        def __init__(self):
            self.calls = []

        def score(self, prompts, replies):
            self.calls.append((list(prompts), list(replies)))
            return np.array([len(r) for r in replies], np.float32)

    rm = LongestReply()
    prompts = [QUESTION, [{"role": "user", "content": "What is 7 - 9?"}]]
    chosen = rerank.best_of_n(decoder, rm, prompts, n=6,
                              sampling=decoding.Sampling(max_new_tokens=6, temperature=1.0))
    scored_prompts, texts = rm.calls[0]
    assert scored_prompts == [prompts[0]] * 6 + [prompts[1]] * 6
    for i, choice in enumerate(chosen):
        group = texts[6 * i:6 * i + 6]
        assert choice.scores == [float(len(t)) for t in group]
        assert choice.text == group[choice.index] and choice.score == max(choice.scores)
    assert len(set(texts[:6])) > 1  # N different samples, not one repeated


def test_best_of_n_as_the_servers_generation_path(tok, tiny_model):
    cfg, graphdef, params = tiny_model
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=16)

    class LongestReply:
        def score(self, prompts, replies):
            assert all(p == QUESTION for p in prompts)  # the prompt ids read back as messages
            self.replies = list(replies)
            return np.array([len(r) for r in replies], np.float32)

    rm = LongestReply()
    sampling = decoding.Sampling(max_new_tokens=6, temperature=1.0, seed=3)
    requests = [(chat_template.prompt(tok, QUESTION), [sampling, sampling])]
    [final] = list(rerank.serve_generate(rm, 4)(decoder, requests))
    assert len(final) == 1 and len(final[0]) == 2  # one request, its two choices
    assert final[0][0].text == max(rm.replies[:4], key=len)
    assert final[0][1].text == max(rm.replies[4:], key=len)
