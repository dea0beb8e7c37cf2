"""The HTML features page: an index whose links all land on a latent's section, the run's
metadata and a key to the colours shown, newlines of the text shown as a return sign and a
real line break (not a literal \\n), and nothing that leaves the page."""

import re
from html.parser import HTMLParser

from minisae.interp import feature_page


class Tok:
    def decode(self, ids):
        return "".join({0: "a", 1: "\n", 2: "\t", 3: "<b>", 4: " x"}[i] for i in ids)


def rows():
    ex = {"tokens": [0, 1, 2, 3, 4], "acts": [0.0, 0.5, 1.0, 0.2, 2.0], "center": 4, "value": 2.0}
    lens = {"promoted": [("a", 1.0), ("b", 0.5)], "suppressed": [("c", -1.0)]}
    return [{"latent": 7, "density": 0.01, "mean_active": 1.0, "max": 2.0, "hist": None, "lens": lens,
             "examples": [ex]},
            {"latent": 9, "density": 0.0, "mean_active": 0.0, "max": 0.0, "hist": None, "lens": lens,
             "examples": []}]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.external = set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag in ("script", "img", "link", "iframe") or "src" in attrs:
            self.external.append(tag)


def test_index_metadata_key_and_newlines():
    page = feature_page.render_html("t", rows(), Tok(), meta={"SAE": "runs/x/saes/topk-k32", "hook": "h<1>"})
    p = Links()
    p.feed(page)
    assert p.external == [] and all(h.startswith("#") for h in p.hrefs)
    assert {h[1:] for h in p.hrefs} <= p.ids  # every link lands on the page
    assert {"#latent-7", "#latent-9", "#top"} <= set(p.hrefs)
    assert "runs/x/saes/topk-k32" in page and "h&lt;1&gt;" in page  # metadata, escaped
    assert "How to read an example" in page and "opacity" in page
    assert "\\n" not in page  # no literal backslash-n anywhere
    assert "\u21b5\n" in page and "\u2192\t" in page and "&lt;b&gt;" in page
    assert "(never fired on these tokens)" in page
    # the terminal view keeps the escapes: one example, one line
    assert feature_page.format_example(Tok(), rows()[0]["examples"][0]).count("\n") == 0
    assert re.search(r"\[\[ x\]\]", feature_page.format_example(Tok(), rows()[0]["examples"][0]))
