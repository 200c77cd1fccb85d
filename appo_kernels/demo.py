"""Score a synthetic batch of tool-using rollouts, choose branch points and compute APPO advantages.

    python -m appo_kernels.demo [--groups 3] [--rollouts 4] [--branches 4] [--seed 0]

It runs every public op on CPU in a few seconds and prints what APPO would do with the batch; the reference
trainer (`appo-train`, docs/trainer.md) shows the same ops inside a real training loop.
"""
from __future__ import annotations

import argparse
import time

import torch

import appo_kernels as ak


def synthetic_batch(groups: int, rollouts: int, length: int, vocab: int, seed: int):
    """Rollouts with tool-output spans (mask 0), padding, and a previous policy that differs from the current
    one after a few 'decisive' tokens, so that Omega carries signal."""
    g = torch.Generator().manual_seed(seed)
    r = groups * rollouts
    sharpness = torch.rand(r, length, 1, generator=g) * 4                 # varied entropy along the text
    logits = torch.randn(r, length, vocab, generator=g) * sharpness
    probs = torch.softmax(logits, -1).reshape(-1, vocab)
    tokens = torch.multinomial(probs, 1, generator=g).reshape(r, length)
    mask = torch.ones(r, length, dtype=torch.bool)
    lengths = torch.randint(length // 2, length + 1, (r,), generator=g)
    for i in range(r):                                                     # build-time only, tiny
        start = int(torch.randint(4, length // 2, (1,), generator=g))
        mask[i, start:start + 6] = False                                   # a tool result
        mask[i, int(lengths[i]):] = False                                  # padding
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    drift = torch.randn(r, length, generator=g) * 0.02
    decisive = torch.rand(r, length, generator=g) < 0.05
    logp_old = logp - drift - decisive * torch.rand(r, length, generator=g) * 0.15
    group_ids = torch.arange(groups).repeat_interleave(rollouts)
    return logits, tokens, mask, logp_old, group_ids


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=4, help="initial rollouts per group")
    ap.add_argument("--branches", type=int, default=4, help="branches per group")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    logits, tokens, mask, logp_old, group_ids = synthetic_batch(args.groups, args.rollouts, args.length,
                                                                args.vocab, args.seed)
    # Warm-up: the first call of any torch custom op imports torch._dynamo (about a second, once per process).
    ak.branching_score(logits[:1, :4], tokens[:1, :4], logp_old[:1, :4], mask[:1, :4], topk=3)
    t0 = time.perf_counter()
    bs = ak.branching_score(logits, tokens, logp_old, mask, topk=3)
    ent_only = ak.score_tokens(bs.entropy, mask=mask)
    points = ak.select_branch_points(bs.score, bs.candidate, group_ids, args.branches, max_len=args.length)
    baseline = ak.select_branch_points(ent_only.score, ent_only.candidate, group_ids, args.branches,
                                       max_len=args.length)
    elapsed = time.perf_counter() - t0

    r = logits.shape[0]
    print(f"appo_kernels {ak.__version__} demo: {args.groups} groups x {args.rollouts} initial rollouts, "
          f"T={args.length}, V={args.vocab}, backend(s) {ak.available_backends()}")
    print(f"scored {int(mask.sum())} generated tokens; {int(bs.candidate.sum())} are candidates "
          f"(high entropy AND high future gain); scoring + selection took {elapsed * 1e3:.1f} ms "
          "(after a warm-up call)\n")
    print("group slot rollout   t  token   score  cand  entropy  omega | entropy-only pick (rollout, t)")
    for grp in range(args.groups):
        for j in range(args.branches):
            i, t = int(points.rollout[grp, j]), int(points.position[grp, j])
            bi, bt = int(baseline.rollout[grp, j]), int(baseline.position[grp, j])
            print(f"{grp:>5} {j:>4} {i:>7} {t:>3} {int(tokens[i, t]):>6} {float(points.score[grp, j]):>7.3f} "
                  f"{'yes' if bool(points.candidate[grp, j]) else 'no':>5} {float(bs.entropy[i, t]):>8.3f} "
                  f"{float(bs.omega[i, t]):>6.3f} | ({bi}, {bt})")

    # Fork the chosen points (here: pretend), give every rollout a reward, and credit the prefixes.
    g = torch.Generator().manual_seed(args.seed + 1)
    parent = torch.cat([torch.full((r,), -1), points.rollout.flatten()])
    split = torch.cat([torch.zeros(r, dtype=torch.int64), points.position.flatten()])
    all_groups = torch.cat([group_ids, torch.arange(args.groups).repeat_interleave(args.branches)])
    rewards = torch.rand(parent.shape[0], generator=g).round()
    all_mask = torch.cat([mask, mask[points.rollout.flatten()]])
    score_at_split = torch.cat([torch.zeros(r), points.score.flatten()])
    adv = ak.procedure_advantages(rewards, all_groups, parent, split, all_mask, branch_score=score_at_split,
                                  branch_strength_scaling=True)
    print("\nrollout reward  A_hat  mean A(t) over its tokens  (branches credit the prefix they share)")
    for i in range(r):
        tok = adv.loss_mask[i]
        print(f"{i:>7} {float(rewards[i]):>6.1f} {float(adv.group_advantages[i]):>6.2f} "
              f"{float(adv.advantages[i][tok].mean()):>10.3f}")


if __name__ == "__main__":
    main()
