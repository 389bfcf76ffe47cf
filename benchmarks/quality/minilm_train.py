"""Fine-tuning and evaluation helpers of the MiniLM quality benchmark (``minilm.py``), CPU.

Texts are tokenised once per (task, split) (``max_len`` 32 holds ~all 5-20-word sentences) and
batched with dynamic padding; training batches are drawn per epoch without replacement and
grouped by length (blocks of 8 batches sorted by length, then the batch order shuffled), so a
batch is padded to ~its own length, not to the longest sentence of the set. The encoder output is
mean-pooled over the attention mask (sentence-transformers pooling) and fed to a linear head.

The head starts as a logistic-regression probe on the frozen base features and is trained jointly
(AdamW, cross-entropy, linear warm-up for 10 % of the steps then linear decay to 0).
"""
from __future__ import annotations

import math
import statistics
import time


def token_ids(tok, texts, max_len):
    """List of token-id lists ([CLS] ... [SEP]), truncated to max_len, not padded."""
    return tok(list(texts), truncation=True, max_length=max_len)["input_ids"]


def collate(ids):
    """Pad a list of id lists to the longest: (input_ids, attention_mask) LongTensors."""
    import torch
    n, L = len(ids), max(len(x) for x in ids)
    out = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return out, mask


def pooled_ids(encoder, ids, mask):
    import torch
    h = encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def embed_ids(encoder, ids, batch=128):
    """Mean-pooled embeddings of pre-tokenised texts (no grad), batches sorted by length."""
    import torch
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    emb = None
    with torch.inference_mode():
        for s in range(0, len(ids), batch):
            idx = order[s:s + batch]
            e = pooled_ids(encoder, *collate([ids[i] for i in idx]))
            if emb is None:
                emb = torch.zeros(len(ids), e.shape[1])
            emb[idx] = e
    return emb


def probe_head(emb, labels, n_classes):
    """Logistic-regression probe on frozen features -> {"weight", "bias"} of an n_classes head."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(emb.numpy(), labels)
    coef, icpt = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:                       # sklearn's one-row binary form -> two rows
        coef, icpt = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    w = torch.zeros(n_classes, emb.shape[1])
    b = torch.zeros(n_classes)
    w[clf.classes_] = torch.tensor(coef, dtype=torch.float32)
    b[clf.classes_] = torch.tensor(icpt, dtype=torch.float32)
    return {"weight": w, "bias": b}


def batches(lengths, batch, steps, seed):
    """`steps` index batches: epochs without replacement, each block of 8 batches sorted by length."""
    import random
    rng = random.Random(seed)
    out = []
    while len(out) < steps:
        idx = list(range(len(lengths)))
        rng.shuffle(idx)
        epoch = []
        for s in range(0, len(idx), 8 * batch):
            block = sorted(idx[s:s + 8 * batch], key=lambda i: lengths[i])
            epoch += [block[j:j + batch] for j in range(0, len(block), batch) if len(block[j:j + batch]) == batch]
        rng.shuffle(epoch)
        out += epoch
    return out[:steps]


def finetune(encoder, head, ids, labels, steps, lr, cfg, seed):
    """Train the encoder's params with requires_grad + the head, in place; returns the head."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    hw = torch.nn.Parameter(head["weight"].clone())
    hb = torch.nn.Parameter(head["bias"].clone())
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": lr},
                             {"params": [hw, hb], "lr": cfg["head_lr"]}], weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    y = torch.tensor(labels)
    encoder.train()
    losses = []
    t0 = time.perf_counter()
    for step, idx in enumerate(batches([len(x) for x in ids], cfg["batch"], steps, seed)):
        e = pooled_ids(encoder, *collate([ids[i] for i in idx]))
        loss = F.cross_entropy(e @ hw.T + hb, y[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + [hw, hb], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 20 == 0:
            print(f"  step {step + 1}/{steps}: loss {statistics.mean(losses[-20:]):.3f}, "
                  f"{(time.perf_counter() - t0) / (step + 1):.2f} s/step", flush=True)
    encoder.eval()
    tail = losses[-max(1, steps // 10):]
    return {"weight": hw.detach().clone(), "bias": hb.detach().clone()}, sum(tail) / len(tail)


def correct(emb, head, labels):
    """Per-example 0/1 correctness of head on embeddings."""
    import torch
    pred = (emb @ head["weight"].T + head["bias"]).argmax(1)
    return (pred == torch.tensor(labels)).int().tolist()


def se(xs):
    """Standard error of a mean of 0/1 outcomes (binomial), as a fraction."""
    n = len(xs)
    p = sum(xs) / n
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def paired_se(a, b):
    """Standard error of mean(a) - mean(b) for paired per-example outcomes on one test set."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / max(1, n - 1)
    return math.sqrt(var / n)
