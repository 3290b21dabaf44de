"""Numerics of learning from preferences, against hand computations: the reward model's pairwise
loss, DPO (log 2 when the policy is the reference), IPO, SimPO, label smoothing, group-relative
advantages, the KL estimate, and per-token log-probabilities without full logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from tunesmith.data.preferences import as_sft, to_preference_examples
from tunesmith.data.readers import Row, read_rows
from tunesmith.errors import DataError
from tunesmith.losses.lm import token_logprobs
from tunesmith.losses.preference import dpo_loss, group_advantages, kl_k3, reward_loss, sequence_sums


def test_reward_loss_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(3.0))) / 2
    assert reward_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_dpo_is_log_2_when_the_policy_is_the_reference() -> None:
    logps = torch.tensor([-12.5, -3.0, -40.0])
    loss, chosen, rejected = dpo_loss(logps, logps - 2, logps, logps - 2, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-7)
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_dpo_by_hand_with_label_smoothing() -> None:
    pc, pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-6.0]), torch.tensor([-8.0])
    beta, eps = 0.5, 0.1
    z = beta * ((-5 + 6) - (-9 + 8))  # 0.5 * (1 + 1) = 1
    expected = -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_ipo_by_hand() -> None:
    pc, pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-6.0]), torch.tensor([-8.0])
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx((2.0 - 1 / (2 * 0.25)) ** 2)  # (h - 1/(2 beta))^2 with h = 2


def test_simpo_by_hand_needs_no_reference() -> None:
    pc, pr = torch.tensor([-6.0]), torch.tensor([-12.0])
    loss, chosen, rejected = dpo_loss(
        pc,
        pr,
        None,
        None,
        beta=2.0,
        loss_type="simpo",
        chosen_tokens=torch.tensor([3.0]),
        rejected_tokens=torch.tensor([4.0]),
        gamma=0.5,
    )
    z = 2.0 * (-6 / 3) - 2.0 * (-12 / 4) - 0.5  # -4 + 6 - 0.5 = 1.5
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)), rel=1e-6)
    assert (chosen.item(), rejected.item()) == (-4.0, -6.0)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo")
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(pc, pr, None, None, beta=2.0)


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected() -> None:
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # -beta * sigmoid(0)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two prompts, three completions each
    grpo = group_advantages(rewards, 3, "grpo", eps=0.0)
    assert grpo[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0])  # mean 2, std (Bessel) 1
    assert grpo[3:].abs().max().item() == 0.0  # equal rewards: no signal
    rloo = group_advantages(rewards, 3, "rloo")
    assert rloo[:3].tolist() == pytest.approx([1 - 2.5, 2 - 2.0, 3 - 1.5])  # minus the mean of the others
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


def test_kl_k3_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert kl_k3(logp, logp).abs().max().item() == 0.0
    d = torch.tensor([0.3, -0.7])
    assert torch.allclose(kl_k3(torch.zeros(2), d), d.exp() - d - 1) and (kl_k3(torch.zeros(2), d) > 0).all()


@pytest.mark.parametrize("weight_trains", [False, True])
def test_token_logprobs_match_full_logits_with_gradients(weight_trains: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 6, dtype=torch.float64, requires_grad=weight_trains)
    targets = torch.randint(0, 17, (11,))
    upstream = torch.randn(11, dtype=torch.float64)

    got = token_logprobs(hidden, weight, targets, chunk=4)  # chunks of 4, 4 and 3 tokens
    (got * upstream).sum().backward()
    got_h, got_w = hidden.grad.clone(), weight.grad.clone() if weight_trains else None  # type: ignore[union-attr]
    hidden.grad, weight.grad = None, None

    want = F.log_softmax(hidden @ weight.T, dim=-1)[torch.arange(11), targets]
    (want * upstream).sum().backward()
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got_h, hidden.grad, rtol=0, atol=1e-12)
    if weight_trains:
        torch.testing.assert_close(got_w, weight.grad, rtol=0, atol=1e-12)


def test_sequence_sums_add_only_the_scored_positions() -> None:
    values = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    rows = torch.tensor([0, 0, 2, 2])  # row 1 has no response token scored
    assert sequence_sums(values, rows, 3).tolist() == [-3.0, 0.0, -7.0]


def test_preference_formats(tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Review X.", "chosen": "Great.", "rejected": "Bad."},
            {
                "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            },
            {
                "input": {"messages": [{"role": "user", "content": "2+2?"}]},
                "preferred_output": [{"role": "assistant", "content": "4"}],
                "non_preferred_output": [{"role": "assistant", "content": "5"}],
            },
        ],
    )
    plain, chat, openai = to_preference_examples(read_rows(path))
    assert plain.kind == "prompt" and plain.prompt[0].content == "Review X." and plain.chosen == "Great."
    assert chat.kind == "chat" and [m.role for m in chat.prompt] == ["system", "user"] and chat.rejected == "Go away."
    assert openai.chosen == "4" and openai.rejected == "5" and openai.where.endswith("p.jsonl:3")
    sft = as_sft(chat, "rejected")
    assert [m.role for m in sft.messages] == ["system", "user", "assistant"] and sft.messages[-1].content == "Go away."


def test_bad_preference_rows_are_all_named() -> None:
    rows = [
        Row({"prompt": "p", "chosen": "same", "rejected": " same "}, "f.jsonl:1"),
        Row({"prompt": "p", "chosen": "a"}, "f.jsonl:2"),
        Row({"prompt": "p", "chosen": "", "rejected": "b"}, "f.jsonl:3"),
        Row(
            {
                "input": {"messages": [{"role": "assistant", "content": "x"}]},
                "preferred_output": "a",
                "non_preferred_output": "b",
            },
            "f.jsonl:4",
        ),
        Row({"question": "q"}, "f.jsonl:5"),
    ]
    with pytest.raises(DataError) as info:
        to_preference_examples(rows)
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "f.jsonl:1: chosen and rejected are the same response" in message
    assert "f.jsonl:2: missing field 'rejected'" in message
    assert "f.jsonl:3: empty 'chosen'" in message
    assert "f.jsonl:4: 'input.messages' must end with a user message" in message
    assert "f.jsonl:5: no preference format matches" in message
