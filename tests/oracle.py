"""Independent float64 oracle for appo_kernels.

Written straight from docs/method.md and docs/api.md as plain Python loops over lists of floats (``math`` only).
It never imports appo_kernels and uses no vectorised torch code: it is meant to be obviously correct, not
fast.  Every function works on python lists; sequence ops work per rollout (a list of per-rollout lists).

Conventions mirrored from docs/api.md:
- masked-out positions (mask == 0) hold 0 in every float per-token output, ``-inf`` in scores and False in
  candidates;
- rows of token_stats whose token equals ``ignore_index`` give 0 in every output (ids 0 too).
"""

import math

INF = float("inf")
NAN = float("nan")


def _isnan(x):
    return math.isnan(x)


# ----------------------------------------------------------------------------------------------------------
# method §1: token statistics
# ----------------------------------------------------------------------------------------------------------


def _row_softmax_parts(logits_row, temperature):
    """s = z / tau, lse = logsumexp(s), p = softmax(s); NaN lse for an all -inf row or a row with a NaN."""
    s = [float(z) / temperature for z in logits_row]
    if any(_isnan(x) for x in s):
        return s, NAN, None
    m = max(s)
    if m == -INF:
        return s, -INF, None
    total = math.fsum(math.exp(x - m) for x in s if x != -INF)
    lse = m + math.log(total)
    p = [math.exp(x - lse) if x != -INF else 0.0 for x in s]
    return s, lse, p


def _topk_order(s, k):
    """The k largest entries of s, descending, ties broken towards the smaller id."""
    ids = list(range(len(s)))
    ids.sort(key=lambda v: (-s[v], v))  # -(-inf) = +inf sorts last, then by id
    return ids[:k]


def token_stats_row(logits_row, token, temperature=1.0, topk=0, ignore_index=-100, entropy="exact"):
    """One row of token_stats.  Returns dict(logp, entropy, lse, topk_ids, topk_logp)."""
    if token == ignore_index:
        return {"logp": 0.0, "entropy": 0.0, "lse": 0.0, "topk_ids": [0] * topk, "topk_logp": [0.0] * topk}
    s, lse, p = _row_softmax_parts(logits_row, temperature)
    if p is None:  # docs/api.md: all -inf row -> lse -inf, NaN logp/entropy/topk_logp; NaN in the row -> all NaN
        return {"logp": NAN, "entropy": NAN, "lse": lse, "topk_ids": None, "topk_logp": [NAN] * topk}
    logp = s[token] - lse
    ids = _topk_order(s, topk)
    topk_logp = [s[v] - lse for v in ids]
    if entropy == "exact":
        # H = lse - sum_v p_v s_v over the full vocabulary (p_v = 0 where s_v = -inf contributes nothing),
        # evaluated as (lse - m) - sum_v p_v (s_v - m) with m = max s: the same number, but without the
        # cancellation of two ~|s| sized terms (for |s| ~ 1e4 that would cost ~1e-8 even in float64)
        m = max(s)
        ent = (lse - m) - math.fsum(pv * (sv - m) for pv, sv in zip(p, s) if pv > 0.0)
    elif entropy == "topk":
        # -sum p log p over topk_ids ∪ {token}, each id once, p the full softmax
        support = set(ids)
        support.add(token)
        ent = 0.0
        for v in sorted(support):
            if p[v] > 0.0:
                ent -= p[v] * (s[v] - lse)
    else:
        raise ValueError(entropy)
    return {"logp": logp, "entropy": ent, "lse": lse, "topk_ids": ids, "topk_logp": topk_logp}


def token_stats(logits_rows, tokens, temperature=1.0, topk=0, ignore_index=-100, entropy="exact"):
    """token_stats over rows.  Returns dict of lists: logp, entropy, lse ([N]); topk_ids, topk_logp ([N][k])."""
    out = {"logp": [], "entropy": [], "lse": [], "topk_ids": [], "topk_logp": []}
    for row, tok in zip(logits_rows, tokens):
        r = token_stats_row(row, tok, temperature, topk, ignore_index, entropy)
        for key, col in out.items():
            col.append(r[key])
    return out


def token_stats_grad_row(logits_row, token, g_lp, g_h, temperature=1.0, topk=0, ignore_index=-100,
                         entropy="exact"):
    """d(g_lp * logp + g_h * entropy) / d logits for one row (list of V floats).

    exact entropy (method §1): dL/ds[v] = g_lp (1[v=a] - p_v) - g_h p_v (s_v - (lse - H)); then / tau.
    topk entropy, H_S = -sum_{u in S} p_u log p_u with dp_u/ds_v = p_u (1[u=v] - p_v):
        dH_S/ds_v = -1[v in S] p_v (log p_v + 1) + p_v sum_{u in S} p_u (log p_u + 1).
    """
    V = len(logits_row)
    if token == ignore_index:
        return [0.0] * V
    s, lse, p = _row_softmax_parts(logits_row, temperature)
    grad = []
    if entropy == "exact":
        ent = token_stats_row(logits_row, token, temperature, topk, ignore_index, "exact")["entropy"]
        for v in range(V):
            d = g_lp * ((1.0 if v == token else 0.0) - p[v])
            if p[v] > 0.0:
                d -= g_h * p[v] * (s[v] - (lse - ent))
            grad.append(d / temperature)
    else:
        support = set(_topk_order(s, topk))
        support.add(token)
        acc = 0.0
        for u in support:
            if p[u] > 0.0:
                acc += p[u] * ((s[u] - lse) + 1.0)
        for v in range(V):
            d = g_lp * ((1.0 if v == token else 0.0) - p[v])
            dh = p[v] * acc
            if v in support and p[v] > 0.0:
                dh -= p[v] * ((s[v] - lse) + 1.0)
            d += g_h * dh
            grad.append(d / temperature)
    return grad


def linear_logits(hidden_rows, weight_rows, bias=None):
    """logits = hidden @ weight.T + bias, in float64 loops."""
    out = []
    for h in hidden_rows:
        row = []
        for v, w in enumerate(weight_rows):
            acc = 0.0 if bias is None else float(bias[v])
            for a, b in zip(h, w):
                acc += float(a) * float(b)
            row.append(acc)
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------
# method §2: future likelihood gain
# ----------------------------------------------------------------------------------------------------------


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def future_values_rollout(logp, logp_old, mask, gamma=1.0, clip_eps=0.2):
    """One rollout: gain F[t] = sum_{k>=t} gamma^(k-t) mask[k] (logp[k]-logp_old[k]); omega = clip(exp(clip(F)))."""
    T = len(logp)
    r = [float(mask[t]) * (float(logp[t]) - float(logp_old[t])) if mask[t] else 0.0 for t in range(T)]
    gain, omega = [], []
    for t in range(T):
        F = 0.0
        for k in range(t, T):
            F += gamma ** (k - t) * r[k]
        if mask[t]:
            gain.append(F)
            omega.append(_clip(math.exp(_clip(F, -20.0, 20.0)), 1.0 - clip_eps, 1.0 + clip_eps))
        else:
            gain.append(0.0)
            omega.append(0.0)
    return omega, gain


def future_values(logp, logp_old, mask, gamma=1.0, clip_eps=0.2):
    """Per-rollout lists in, (omega rows, gain rows) out."""
    omegas, gains = [], []
    for lp, lpo, m in zip(logp, logp_old, mask):
        o, g = future_values_rollout(lp, lpo, m, gamma, clip_eps)
        omegas.append(o)
        gains.append(g)
    return omegas, gains


# ----------------------------------------------------------------------------------------------------------
# method §3: branching score
# ----------------------------------------------------------------------------------------------------------


def zscore(values, eligible):
    """Z over the eligible positions: (x - mean) / (population std + 1e-6); None at ineligible positions."""
    xs = [float(v) for v, e in zip(values, eligible) if e]
    out = [None] * len(values)
    if not xs:
        return out
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / len(xs)
    std = math.sqrt(var)
    for t, (v, e) in enumerate(zip(values, eligible)):
        if e:
            out[t] = (float(v) - mean) / (std + 1e-6)
    return out


def score_tokens_rollout(entropy, logp=None, logp_old=None, mask=None, eligible=None, gamma=1.0,
                         clip_eps=0.2):
    """One rollout of score_tokens.  Returns dict(score, candidate, z_entropy, z_omega, omega, entropy, logp)."""
    T = len(entropy)
    if mask is None:
        mask = [1] * T
    elig = [bool(mask[t]) and (eligible is None or bool(eligible[t])) for t in range(T)]
    zh = zscore(entropy, elig)
    omega = None
    zo = None
    if logp_old is not None:
        omega, _ = future_values_rollout(logp, logp_old, mask, gamma, clip_eps)
        zo = zscore(omega, elig)
    score, cand = [], []
    for t in range(T):
        if not elig[t]:
            score.append(-INF)
            cand.append(False)
        elif zo is None:
            score.append(zh[t])
            cand.append(zh[t] > 0)
        else:
            score.append(zh[t] * zo[t])
            cand.append(zh[t] > 0 and zo[t] > 0)
    ent_out = [float(entropy[t]) if mask[t] else 0.0 for t in range(T)]
    lp_out = None if logp is None else [float(logp[t]) if mask[t] else 0.0 for t in range(T)]
    return {"score": score, "candidate": cand, "z_entropy": zh, "z_omega": zo, "omega": omega, "entropy": ent_out,
                "logp": lp_out}


def score_tokens(entropy, logp=None, logp_old=None, mask=None, eligible=None, gamma=1.0, clip_eps=0.2):
    """Per-rollout lists in; dict of per-rollout lists out."""
    keys = ["score", "candidate", "z_entropy", "z_omega", "omega", "entropy", "logp"]
    out = {k: [] for k in keys}
    for b in range(len(entropy)):
        r = score_tokens_rollout(entropy[b], None if logp is None else logp[b],
                                 None if logp_old is None else logp_old[b],
                                 None if mask is None else mask[b],
                                 None if eligible is None else eligible[b], gamma, clip_eps)
        for k in keys:
            out[k].append(r[k])
    return out


# ----------------------------------------------------------------------------------------------------------
# method §4: choosing branch points
# ----------------------------------------------------------------------------------------------------------


def select_branch_points(scores, candidates, group_ids, num_branches, num_groups=None, max_len=None,
                         max_per_rollout=None, min_distance=0):
    """scores/candidates: per-rollout lists (position t = index in the list).

    Returns dict of [G][num_branches] lists: rollout, position, score, candidate, valid.
    """
    G = num_groups if num_groups is not None else max(group_ids) + 1
    out = {"rollout": [], "position": [], "score": [], "candidate": [], "valid": []}
    for g in range(G):
        pool = []
        for r, gid in enumerate(group_ids):
            if gid != g:
                continue
            for t, sc in enumerate(scores[r]):
                sc = float(sc)
                if _isnan(sc) or sc in (INF, -INF):
                    continue  # eligible only when the score is finite
                if max_len is not None and t >= max_len - 1:
                    continue  # no room left to generate
                tier = 0 if candidates[r][t] else 1
                pool.append((tier, -sc, r, t))
        pool.sort()  # candidates first; score desc; rollout asc; position asc
        chosen = []
        per_rollout = {}
        for tier, neg_sc, r, t in pool:
            if len(chosen) == num_branches:
                break
            if max_per_rollout is not None and per_rollout.get(r, 0) >= max_per_rollout:
                continue
            if min_distance > 1 and any(r2 == r and abs(t - t2) < min_distance for (_, _, r2, t2) in chosen):
                continue
            chosen.append((tier, neg_sc, r, t))
            per_rollout[r] = per_rollout.get(r, 0) + 1
        n = len(chosen)
        row = {"rollout": [], "position": [], "score": [], "candidate": [], "valid": []}
        for j in range(num_branches):
            if n == 0:
                row["rollout"].append(-1)
                row["position"].append(-1)
                row["score"].append(-INF)
                row["candidate"].append(False)
                row["valid"].append(False)
            else:
                tier, neg_sc, r, t = chosen[j % n]
                row["rollout"].append(r)
                row["position"].append(t)
                row["score"].append(-neg_sc)
                row["candidate"].append(tier == 0)
                row["valid"].append(True)
        for k, col in out.items():
            col.append(row[k])
    return out


# ----------------------------------------------------------------------------------------------------------
# method §5: dual-group advantages
# ----------------------------------------------------------------------------------------------------------


def group_advantages(rewards, group_ids, is_branch=None, scale_by_std=True):
    """A_hat within (group, kind): (r - mean) / (population std + 1e-6), or r - mean."""
    R = len(rewards)
    if is_branch is None:
        is_branch = [False] * R
    out = [0.0] * R
    for i in range(R):
        peers = [float(rewards[j]) for j in range(R)
                 if group_ids[j] == group_ids[i] and bool(is_branch[j]) == bool(is_branch[i])]
        mean = sum(peers) / len(peers)
        std = math.sqrt(sum((x - mean) ** 2 for x in peers) / len(peers))
        a = float(rewards[i]) - mean
        out[i] = a / (std + 1e-6) if scale_by_std else a
    return out


def procedure_advantages(rewards, group_ids, parent, split, mask, branch_score=None, scale_by_std=True,
                         branch_strength_scaling=False, decay=0.9, train_branches=False):
    """mask: per-rollout lists (position coordinates shared by a branch and its parent).

    Returns dict(advantages, loss_mask, multiplier) as per-rollout lists and group_advantages as [R].
    """
    R = len(rewards)
    is_branch = [p >= 0 for p in parent]
    a_hat = group_advantages(rewards, group_ids, is_branch, scale_by_std)
    adv, loss_mask, mult = [], [], []
    for i in range(R):
        T = len(mask[i])
        if is_branch[i]:
            s_b = split[i]
            a_row, l_row = [], []
            for t in range(T):
                if train_branches and t > s_b and mask[i][t]:
                    a_row.append(a_hat[i])
                    l_row.append(True)
                else:
                    a_row.append(0.0)
                    l_row.append(False)
            adv.append(a_row)
            loss_mask.append(l_row)
            mult.append([0.0] * T)
            continue
        kids = [b for b in range(R) if parent[b] == i]
        weights = {}
        if branch_strength_scaling:
            top = max(float(branch_score[b]) for b in kids) if kids else 0.0
            for b in kids:
                weights[b] = max(float(branch_score[b]), 0.0) / top if top > 0 else 0.0
        a_row, l_row, m_row = [], [], []
        for t in range(T):
            if not mask[i][t]:
                a_row.append(0.0)
                l_row.append(False)
                m_row.append(0.0)
                continue
            sharing = [b for b in kids if split[b] >= t]
            base = a_hat[i]
            if sharing:
                base += sum(a_hat[b] for b in sharing) / len(sharing)
            if branch_strength_scaling and kids:
                ms = []
                for b in kids:
                    if t <= split[b]:
                        ms.append(1.0 + weights[b] * decay ** (split[b] - t))
                    else:
                        ms.append(1.0)
                m = sum(ms) / len(ms)
            else:
                m = 1.0
            a_row.append(base * m)
            l_row.append(True)
            m_row.append(m)
        adv.append(a_row)
        loss_mask.append(l_row)
        mult.append(m_row)
    return {"advantages": adv, "loss_mask": loss_mask, "multiplier": mult, "group_advantages": a_hat}


# ----------------------------------------------------------------------------------------------------------
# method §6: future-KL advantage weighting
# ----------------------------------------------------------------------------------------------------------


def future_kl_weights_rollout(logp, logp_old, adv, mask, gamma=2 ** (-1 / 64), clip_ratio_c=3.0,
                              clip_eps=0.2, high_only=True, coef=1.0, ratio_threshold=6.0):
    T = len(logp)
    delta = [_clip(float(logp[k]) - float(logp_old[k]), -20.0, 20.0) for k in range(T)]
    keep = [delta[k] <= math.log(clip_ratio_c) for k in range(T)]
    weights, adv_out = [], []
    for t in range(T):
        if not mask[t]:
            weights.append(0.0)
            adv_out.append(0.0)
            continue
        fkl = 0.0
        for k in range(t, T):
            if keep[k] and mask[k]:
                fkl += gamma ** (k - t) * delta[k]
        lo = 1.0 if high_only else 1.0 - clip_eps
        f = _clip(math.exp(fkl), lo, 1.0 + clip_eps)
        if float(adv[t]) < 0 and math.exp(delta[t]) > ratio_threshold:
            f = _clip(f, 1.0 - clip_eps, 1.0)
        weights.append(f)
        adv_out.append(float(adv[t]) * (1.0 + coef * f))
    return weights, adv_out


def future_kl_weights(logp, logp_old, adv, mask, **kw):
    ws, advs = [], []
    for lp, lpo, a, m in zip(logp, logp_old, adv, mask):
        w, ao = future_kl_weights_rollout(lp, lpo, a, m, **kw)
        ws.append(w)
        advs.append(ao)
    return ws, advs


# ----------------------------------------------------------------------------------------------------------
# method §7: policy loss
# ----------------------------------------------------------------------------------------------------------


def policy_loss(logp, logp_old, adv, mask, logp_ref=None, eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0,
                kl_coef=0.001, kl_estimator="k3", aggregation="token-mean", token_count=None, loss_scale=None,
                entropy=None, entropy_coef=0.0, drop_dual_clipped=True, kl_clamp=10.0):
    """Per-rollout lists in.  Returns dict(loss, pg_loss, kl, clip_fraction, dual_clip_fraction).

    pg_loss is reported with the token-mean aggregation over mask (the only case the tests compare).
    clip_fraction: fraction of masked tokens where the clipped branch is strictly larger (active);
    dual_clip_fraction: fraction of masked tokens with A < 0 where the dual clip bound is active.
    drop_dual_clipped (the authors' filter): a rollout with more than one masked token where A < 0 and
    ratio > c loses its surrogate terms; with token-mean (no token_count) the surrogate is the mean over the
    kept tokens and the KL / entropy terms the mean over all masked tokens. kl_clamp clips each KL value.
    """
    use_kl = logp_ref is not None and kl_coef > 0
    dropped = []
    for b in range(len(logp)):
        hits = sum(1 for t in range(len(logp[b])) if mask[b][t] and float(adv[b][t]) < 0
                   and math.exp(float(logp[b][t]) - float(logp_old[b][t])) > clip_ratio_c)
        dropped.append(drop_dual_clipped and hits > 1)
    per_seq = []  # list of (list of per-token loss at masked tokens)
    pg_kept, other_all = [], []  # token-mean parts: surrogate of kept rollouts, KL / entropy of all
    pg_all, kl_all, clip_flags, dual_flags = [], [], [], []
    for b in range(len(logp)):
        toks = []
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            a = float(adv[b][t])
            ratio = math.exp(float(logp[b][t]) - float(logp_old[b][t]))
            pg1 = -a * ratio
            pg2 = -a * _clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
            pg = max(pg1, pg2)
            clip_flags.append(pg2 > pg1)
            dual = False
            if a < 0:
                pg3 = -a * clip_ratio_c
                dual = pg > pg3
                pg = min(pg, pg3)
            dual_flags.append(dual)
            pg_used = 0.0 if dropped[b] else pg
            if not dropped[b]:
                pg_kept.append(pg)
            loss_t = pg_used
            other = 0.0
            if use_kl:
                d = _clip(float(logp_ref[b][t]) - float(logp[b][t]), -20.0, 20.0)
                if kl_estimator == "k1":
                    kl = -d
                elif kl_estimator == "k2":
                    kl = d * d / 2.0
                elif kl_estimator == "k3":
                    kl = math.exp(d) - d - 1.0
                else:
                    raise ValueError(kl_estimator)
                if kl_clamp is not None:
                    kl = _clip(kl, -kl_clamp, kl_clamp)
                kl_all.append(kl)
                other += kl_coef * kl
            if entropy is not None and entropy_coef != 0.0:
                other -= entropy_coef * float(entropy[b][t])
            loss_t += other
            other_all.append(other)
            pg_all.append(pg)
            toks.append(loss_t)
        per_seq.append(toks)
    n_tok = sum(len(s) for s in per_seq)
    if aggregation == "token-mean" and token_count is None:
        loss = (sum(pg_kept) / len(pg_kept) if pg_kept else 0.0) + (sum(other_all) / n_tok if n_tok else 0.0)
    elif aggregation == "token-mean":
        loss = sum(sum(s) for s in per_seq) / token_count
    elif aggregation == "seq-mean-token-mean":
        loss = sum(sum(s) / len(s) for s in per_seq) / len(per_seq)
    elif aggregation == "seq-mean-token-sum":
        loss = sum(sum(s) for s in per_seq) / len(per_seq)
    elif aggregation == "seq-mean-token-sum-norm":
        loss = sum(sum(s) / loss_scale for s in per_seq) / len(per_seq)
    else:
        raise ValueError(aggregation)
    return {
        "loss": loss,
        "pg_loss": sum(pg_all) / n_tok,
        "kl": (sum(kl_all) / n_tok) if use_kl else 0.0,
        "clip_fraction": sum(clip_flags) / n_tok,
        "dual_clip_fraction": sum(dual_flags) / n_tok,
    }
