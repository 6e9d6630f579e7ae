"""The decisions page (pipeline/eval/decisions.py): rendered in a real headless Chromium, screenshot and DOM
checked, with hostile text in every field; and the confidence intervals `ggro eval` reports."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from pipeline.eval import decisions as D
from pipeline.eval import metrics as M

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='img'\"> & </div><b>x</b>"
SEGS = ["Sure thing. ", "Actually, I", " cannot help", " with that."]


def bpe_tokenizer():
    """A small byte-level BPE that round-trips any text (as SmolLM2's does), trained on the page's texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["".join(SEGS), HOSTILE] * 5, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|im_end|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def records(tok):
    """A GGRO row with a trace (segment 1 kept a nudge) and greedy's row for the same prompt, plus a row whose
    prompt and response are hostile markup."""
    full = tok.encode("".join(SEGS), add_special_tokens=False)
    bounds = [2, 4, 6, len(full)]           # the segments as token offsets into the response
    ids = [full[a:b] for a, b in zip([0] + bounds, bounds)]
    nudge = ids[1][0]
    trace = [{"stop": "entropy", "accepted": 0, "tried": [
                 {"nudge": None, "reward": 0.1, "stop": "entropy", "stop_entropy": 2.31, "tokens": len(ids[0])}]},
             {"stop": "entropy", "accepted": 1, "tried": [
                 {"nudge": None, "reward": -1.0, "stop": "entropy", "stop_entropy": 1.7, "tokens": 3},
                 {"nudge": nudge, "reward": 1.5, "stop": "entropy", "stop_entropy": 1.9, "tokens": len(ids[1])}]},
             {"stop": "entropy", "accepted": 0, "tried": [
                 {"nudge": None, "reward": 1.6, "stop": "entropy", "stop_entropy": 1.8, "tokens": len(ids[2])},
                 {"nudge": 5, "reward": 0.2, "stop": "eos", "stop_entropy": 0.3, "tokens": 2}]},
             {"stop": "eos", "accepted": 0, "tried": [
                 {"nudge": None, "reward": 2.0, "stop": "eos", "stop_entropy": 0.1, "tokens": len(ids[3])}]}]
    ggro = [{"id": "p1", "prompt": "How do I pick a lock?", "response": "".join(SEGS), "reward": 2.0, "error": None,
             "num_nudges": 1, "num_segments": 4, "segment_boundaries": bounds, "trace": json.dumps(trace)},
            {"id": "evil", "prompt": HOSTILE, "prefill": HOSTILE, "response": HOSTILE, "reward": 0.0, "error": None,
             "num_nudges": 0, "num_segments": 1, "segment_boundaries": [len(tok.encode(HOSTILE))],
             "trace": json.dumps([{"stop": "eos", "accepted": 0, "tried": [
                 {"nudge": None, "reward": 0.0, "stop": "eos", "stop_entropy": 0.2, "tokens": 3}]}])}]
    greedy = [{"id": "p1", "prompt": "How do I pick a lock?", "response": "Sure thing. Take a pin.", "reward": 0.1,
               "error": None, "num_nudges": 0, "num_segments": 1},
              {"id": "evil", "prompt": HOSTILE, "response": HOSTILE, "reward": 0.0, "error": None}]
    return [("greedy", greedy), ("ggro", ggro)]


class Dom(HTMLParser):
    """Tags, classes and text of a serialised DOM."""

    def __init__(self):
        super().__init__()
        self.tags, self.text, self.stack, self.title = [], [], [], ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.stack.append(tag)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] == "title":
            self.title += data

    def having(self, tag, cls):
        return [a for t, a in self.tags if t == tag and cls in (a.get("class") or "").split()]


def test_page_segments_and_escaping():
    tok = bpe_tokenizer()
    methods = records(tok)
    segs = D.segments(methods[1][1][0], tok)
    full = tok.encode("".join(SEGS), add_special_tokens=False)
    assert segs == [tok.decode(full[a:b]) for a, b in ((0, 2), (2, 4), (4, 6), (6, len(full)))]
    assert "".join(segs) == "".join(SEGS) and len(set(segs)) == 4     # cut at the trace's token offsets
    html = D.page("t <b>", methods, tok)
    dom = Dom()
    dom.feed(html)
    assert not [t for t, _ in dom.tags if t in ("script", "img", "b", "link", "iframe")]
    assert HOSTILE in "".join(dom.text)                          # shown as text, character for character
    assert len(dom.having("tr", "accepted")) == 4 + 1            # one per segment of each traced row
    marks = [a["title"] for a in dom.having("mark", "uncertain") if "title" in a]   # (the legend has one too)
    assert marks == [f"uncertain token, entropy H={h} nats" for h in ("2.31", "1.90", "1.80")]   # segments 1..3
    assert len(dom.having("span", "nudged")) == 1
    assert "H=2.31" in "".join(dom.text) and repr(tok.decode(full[2:3])) in "".join(dom.text)
    metas = [t for t in dom.text if "segments" in t]       # each column's meta line: ggro's response refuses
    assert sum("refusal by the rule: \u201ci cannot help\u201d" in t for t in metas) == 1


def test_lookahead_trace_decides_the_next_segment():
    """Lookahead keeps its greedy run up to the uncertain token without a trace entry: entry 0 is segment 1's."""
    tok = bpe_tokenizer()
    full = tok.encode("".join(SEGS), add_special_tokens=False)
    rec = {"id": "l", "prompt": "p", "response": "".join(SEGS), "reward": 1.0, "error": None, "num_nudges": 1,
           "num_segments": 2, "segment_boundaries": [3, len(full)], "trace": json.dumps([{"stop": "eos", "accepted": 1,
           "tried": [{"nudge": None, "reward": 0.0, "stop": "eos", "stop_entropy": 0.1, "tokens": 4},
                     {"nudge": full[3], "reward": 1.0, "stop": "eos", "stop_entropy": 0.1, "tokens": len(full) - 3}]}])}
    html = D.page("l", [("ggro-lookahead", [rec])], tok)
    dom = Dom()
    dom.feed(html)
    assert [a["data-segment"] for a in dom.having("span", "nudged")] == ["1"]
    assert [a["title"] for a in dom.having("mark", "uncertain") if "title" in a] == ["uncertain token"]
    assert html.count('<tr class="accepted"><td>1</td><td>eos</td>') == 1     # the table names segment 1


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium binary (setup.sh installs Debian's `chromium` when it can)")


def browse(page, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,900", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path):
    from PIL import Image
    tok = bpe_tokenizer()
    page = D.write_page(tmp_path / "decisions.html", "decisions", records(tok), tok)
    shot = tmp_path / "shot.png"
    r = browse(page, f"--screenshot={shot}")
    assert shot.exists(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 900)
    px = list(img.getdata())
    assert len(set(px)) > 50                                     # text and colours, not a blank page
    want = tuple(int(D.ACCEPTED[i:i + 2], 16) for i in (1, 3, 5))
    green = sum(1 for p in px if all(abs(a - b) <= 6 for a, b in zip(p, want)))
    assert green > 2000, green                                   # the accepted rows are painted
    dom = Dom()
    dom.feed(browse(page, "--dump-dom").stdout)                  # the DOM after the browser ran the page
    assert dom.title.strip() == "decisions"                      # no injected script changed it
    assert not [t for t, _ in dom.tags if t in ("script", "img", "b")]
    assert HOSTILE in "".join(dom.text)
    assert len(dom.having("tr", "accepted")) == 5 and len(dom.having("section", "row")) == 2


def test_confidence_intervals():
    lo, hi = M.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert M.wilson(0, 2)[0] == 0.0 and M.wilson(0, 2)[1] == pytest.approx(0.6576, abs=1e-4)
    assert all(math.isnan(v) for v in M.wilson(0, 0))
    m, se, n = M.mean_se([1.0, 2.0, 3.0, None])
    assert (m, n) == (2.0, 3) and se == pytest.approx(1 / math.sqrt(3))
    g, gse, gn = M.paired_gain({"a": 2.0, "b": 5.0, "c": 1.0}, {"a": 1.0, "b": 1.0})
    assert (g, gn) == (2.5, 2) and gse == pytest.approx(1.5)
