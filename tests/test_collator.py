import torch

from orpo.data.collator import PaddedPairCollator

FEATURES = [
    {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]},
    {"prompt_input_ids": [11], "chosen_input_ids": [12, 13, 14], "rejected_input_ids": [15, 16]},
]


def test_layout_and_scored_tokens():
    batch = PaddedPairCollator(pad_token_id=0)(FEATURES)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],
        [11, 12, 13, 14, 0],
        [5, 6, 7, 10, 0],
        [11, 15, 16, 0, 0],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [5, 4, 4, 3]
    flat = batch["input_ids"].flatten()
    # each scored target is the token right after the position that predicts it
    assert torch.equal(flat[batch["score_positions"] + 1], batch["score_targets"])
    # pair by pair, chosen before rejected: each pair's tokens are contiguous
    assert batch["score_targets"].tolist() == [8, 9, 10, 12, 13, 14, 15, 16]
    assert batch["score_pair"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert batch["score_chosen"].tolist() == [True, True, False, True, True, True, False, False]
    assert batch["score_response"].all()
    assert int(batch["num_pairs"]) == 2


def test_nll_include_prompt_scores_chosen_prompt_tokens_only():
    batch = PaddedPairCollator(pad_token_id=0, nll_include_prompt=True)(FEATURES)
    prompt_tokens = ~batch["score_response"]
    assert batch["score_targets"][prompt_tokens].tolist() == [6, 7]  # pair 0 prompt after its first token
    assert batch["score_chosen"][prompt_tokens].all()
    assert batch["score_targets"][batch["score_response"]].tolist() == [8, 9, 10, 12, 13, 14, 15, 16]


def test_pad_to_multiple_of_only_adds_padding():
    a = PaddedPairCollator(pad_token_id=0)(FEATURES)
    b = PaddedPairCollator(pad_token_id=0, pad_to_multiple_of=8)(FEATURES)
    assert b["input_ids"].shape[1] == 8
    assert torch.equal(b["input_ids"][:, :5], a["input_ids"]) and (b["input_ids"][:, 5:] == 0).all()
    assert torch.equal(b["input_ids"].flatten()[b["score_positions"] + 1], a["score_targets"])


def test_packed_shared_prefix_layout():
    from orpo.data.collator import SharedPrefixCollator

    features = [
        {"prompt_input_ids": [1, 2, 3, 4], "chosen_input_ids": [5, 6], "rejected_input_ids": [7, 8]},
        {"prompt_input_ids": [9], "chosen_input_ids": [10], "rejected_input_ids": [11]},
        {"prompt_input_ids": [12], "chosen_input_ids": [13, 14], "rejected_input_ids": [15]},
    ]
    batch = SharedPrefixCollator(pad_token_id=0, pack=True)(features)
    # first-fit decreasing into rows as wide as the longest pair: pair 0 alone, then pairs 2 and 1
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [12, 13, 14, 15, 9, 10, 11, 0]]
    # rejected positions continue from the prompt, as if chosen were not there; each pair restarts at 0
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 4, 5], [0, 1, 2, 1, 0, 1, 1, 0]]
    # 3 * unit + kind (0 prompt, 1 chosen, 2 rejected); -1 padding
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 3, 4, 5, -1]]
    # pair 1's rejected token 11 is predicted by its prompt token 9 (flat 12), not by chosen token 10
    assert batch["score_targets"].tolist() == [5, 6, 7, 8, 10, 11, 13, 14, 15]
    assert batch["score_positions"].tolist()[5] == 12
    assert int(batch["num_tokens"]) == 15 and int(batch["num_pairs"]) == 3
