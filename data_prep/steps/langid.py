"""Language identification with py3langid (offline model in the wheel), per-language thresholds.

Code is never identified here: its language is set by the source (`lang: code`) and passes through.
"""

from __future__ import annotations

from data_prep.config import LangIdConfig
from data_prep.records import Doc
from data_prep.steps.base import DocStep, Drop, StepCounts


class LangIdStep(DocStep):
    name = "langid"

    def __init__(self, out_dir, cfg: LangIdConfig):
        super().__init__(out_dir)
        self.cfg = cfg
        self._ident = None

    def setup(self) -> None:
        if self._ident is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            # Normalised probabilities, so a threshold means the same for every document length.
            self._ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def classify(self, text: str) -> tuple[str, float]:
        self.setup()
        lang, prob = self._ident.classify(text[: self.cfg.max_chars])
        return lang, float(prob)

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        if doc.lang == "code":
            counts.notes["code_by_source"] += 1
            return doc
        lang, prob = self.classify(doc.text)
        if doc.lang and doc.lang != lang:
            # The source declared a language: LID disagreeing is a reason, not a silent relabel.
            return Drop(f"lang_mismatch:{lang}", detail=f"declared {doc.lang}, detected {lang} p={prob:.3f}")
        if lang not in self.cfg.languages:
            return Drop(f"lang:{lang}", detail=f"p={prob:.3f}")
        if prob < self.cfg.thresholds[lang]:
            return Drop(f"low_confidence:{lang}", detail=f"p={prob:.3f} < {self.cfg.thresholds[lang]}")
        doc.lang = lang
        doc.meta["lang_prob"] = round(prob, 4)
        return doc
