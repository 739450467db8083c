"""Long form: brief -> premise -> outline -> chapter plans -> chapter drafts, each stage a file.

    book/brief.txt            the brief (and language) the book was started with
    book/premise.md
    book/outline.md           one numbered line per chapter
    book/chapters/01-plan.md  the scenes of chapter 1
    book/chapters/01.md       its draft
    book/summary/01.md        the story so far after chapter 1 (rolling summary)
    book/ledger/01.md         characters and facts chapter 1 established

Every stage reads the files of earlier stages as they are on disk, so a writer's edits are
respected. Rerunning generates only what is missing, from the first missing stage on; when a
chapter is (re)generated, its summary and ledger are rewritten because they describe it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmos.writing.tasks import WriteRequest, prepare_write


class NovelError(ValueError):
    pass


@dataclass
class Stage:
    path: Path
    generated: bool  # False: it was on disk already
    what: str = ""  # "premise", "outline", "plan of chapter 1", ...


def _atomic_write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text.strip() + "\n", encoding="utf-8")
    tmp.replace(path)


def parse_numbered(text: str) -> list[str]:
    items = []
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)[.)、:：]\s*(.+)", line)
        if m:
            items.append(m.group(2).strip())
    return items


class Novel:
    def __init__(self, llm, out: str | Path, brief: str | None = None, chapters: int = 5, lang: str | None = None,
                 seed: int | None = None, on_stage: Callable[[str, Path], None] | None = None):
        self.llm, self.out, self.seed = llm, Path(out), seed
        self.on_stage = on_stage or (lambda what, path: None)
        brief_file = self.out / "brief.txt"
        if brief_file.exists():
            saved = brief_file.read_text(encoding="utf-8").split("\n", 2)
            self.lang, self.chapters, self.brief = saved[0].strip(), int(saved[1]), saved[2].strip()
        else:
            if not brief:
                raise NovelError(f"{self.out} holds no book yet: give a brief to start one")
            if chapters < 1 or chapters > 99:
                raise NovelError(f"--chapters must be between 1 and 99, got {chapters}")
            from llmos.writing.tasks import pick_language

            self.lang, self.chapters, self.brief = pick_language(brief, lang), chapters, brief.strip()
            _atomic_write(brief_file, f"{self.lang}\n{self.chapters}\n{self.brief}")

    def _generate(self, task: str, brief: str, **variables) -> str:
        req = WriteRequest(task, brief, {k: str(v) for k, v in variables.items()}, lang=self.lang,
                           overrides={"seed": self.seed})
        prompt, params, stops, _ = prepare_write(self.llm, req)
        result = self.llm.generate(prompt, params, stop=stops, truncate="left")
        return result.completions[0].text.strip()

    def _stage(self, path: Path, what: str, make: Callable[[], str]) -> Stage:
        if path.exists() and path.read_text(encoding="utf-8").strip():
            return Stage(path, False, what)
        self.on_stage(what, path)
        text = make().strip()
        # a model that wrote nothing still completes the stage: rerunning would only repeat it
        _atomic_write(path, text or ("(nothing was written; edit this file)" if self.lang == "en" else "（未生成内容，可手动编辑）"))
        return Stage(path, True, what)

    def read(self, path: Path) -> str:
        return path.read_text(encoding="utf-8").strip() if path.exists() else ""

    def outline_items(self) -> list[str]:
        items = parse_numbered(self.read(self.out / "outline.md"))
        return items[: self.chapters]

    def run(self) -> list[Stage]:
        return list(self.stages())

    def stages(self) -> Iterator[Stage]:
        """Each stage as it is done (or found done on disk), in order."""
        yield self._stage(self.out / "premise.md", "premise", lambda: self._generate("novel-premise", self.brief))
        premise = self.read(self.out / "premise.md")

        def outline():
            text = ""
            for attempt in range(3):  # small models sometimes stop short of N chapters
                text = "1. " + self._generate("novel-outline", premise, chapters=self.chapters)
                if len(parse_numbered(text)) >= self.chapters:
                    break
            items = parse_numbered(text)
            while len(items) < self.chapters:
                items.append("The story continues." if self.lang == "en" else "故事继续。")
            return "\n".join(f"{i + 1}. {item}" for i, item in enumerate(items[: self.chapters]))

        yield self._stage(self.out / "outline.md", "outline", outline)
        outline_text = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(self.outline_items()))
        for k in range(1, self.chapters + 1):
            num = f"{k:02d}"
            summary = self.read(self.out / "summary" / f"{k - 1:02d}.md") if k > 1 else ""
            ledger = "\n".join(self.read(p) for p in sorted((self.out / "ledger").glob("*.md")) if int(p.stem) < k)
            plan = self._stage(self.out / "chapters" / f"{num}-plan.md", f"plan of chapter {k}",
                               lambda: "1. " + self._generate("novel-plan", self.brief, chapter=k, outline=outline_text,
                                                              summary=summary, ledger=ledger))
            yield plan
            plan_text = self.read(plan.path)
            chapter = self._stage(self.out / "chapters" / f"{num}.md", f"chapter {k}",
                                  lambda: self._generate("novel-chapter", self.brief, chapter=k, plan=plan_text,
                                                         summary=summary, ledger=ledger))
            yield chapter
            text = self.read(chapter.path)
            for kind, task, extra in (("summary", "novel-summary", {"summary": summary}), ("ledger", "novel-ledger", {})):
                path = self.out / kind / f"{num}.md"
                if chapter.generated and path.exists():
                    path.unlink()  # it described the chapter that was just replaced
                yield self._stage(path, f"{kind} of chapter {k}", lambda: self._generate(task, text, **extra))
