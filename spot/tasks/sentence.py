"""Single-text classification tasks: sst2, sst5, mr, subj, mpqa, trec, agnews, cola."""

from __future__ import annotations

import re
from collections.abc import Callable

from spot.tasks.core import Example, Task
from spot.tasks.files import clean, data_file, read_rows
from spot.tasks.registry import register_task
from spot.tasks.splits import complete_splits, split_single

SENTIMENT = (" negative", " positive")
SST5 = (" terrible", " bad", " okay", " good", " great")
# subj.all: 0 = review snippet (subjective), 1 = plot summary (objective).
SUBJECTIVITY = (" subjective", " objective")
TREC = (" description", " entity", " abbreviation", " person", " location", " number")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
AGNEWS = (" world", " sports", " business", " technology")
YES_NO = (" no", " yes")

REVIEW = "Sentence: {text}\nThe sentiment of the sentence is"


def label_lines(
    folder: str,
    filename: str,
    template: str,
    choices: tuple[str, ...],
    encoding: str = "utf-8",
) -> list[Example]:
    """The harvardnlp "<label> <text>" line format (sst5, mr, subj, mpqa, trec)."""

    def convert(line: str) -> Example:
        label, _, text = line.partition(" ")
        return Example(template.format(text=clean(text)), choices, int(label))

    return read_rows(data_file(folder, filename), convert, encoding=encoding)


def sst2() -> dict[str, list[Example]]:
    def read(filename: str) -> list[tuple[bool, Example]]:
        def convert(line: str) -> tuple[bool, Example]:
            sentence, label = line.split("\t")
            example = Example(REVIEW.format(text=clean(sentence)), SENTIMENT, int(label))
            return is_sentence(sentence), example

        return read_rows(data_file("sst2", filename), convert, header=True)

    train, dev, test = read("train.tsv"), read("dev.tsv"), read("test.tsv")
    validation = [ex for full, ex in dev if full]
    rows = [ex for _, ex in train] + [ex for full, ex in dev if not full]
    # A validation sentence's root phrase (the sentence without its final . ! or ?) is often a
    # training row with the same label: kept, validation would half score memorised rows.
    held_out = {letters_and_digits(ex.text) for ex in validation}
    return {
        "train": [ex for ex in rows if letters_and_digits(ex.text) not in held_out],
        "validation": validation,
        "test": [ex for _, ex in test],
    }


def is_sentence(text: str) -> bool:
    """A complete SST sentence rather than a parse-tree phrase: it ends in . ! or ?."""
    return text.rstrip().endswith((".", "!", "?"))


def letters_and_digits(text: str) -> str:
    """`text` lowercased with only its letters and digits: SST phrases match their sentences."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def sst5() -> dict[str, list[Example]]:
    files = {
        "train": "stsa.fine.train",
        "validation": "stsa.fine.dev",
        "test": "stsa.fine.test",
    }
    return {
        split: label_lines("sst5", name, REVIEW, SST5) for split, name in files.items()
    }


def mr() -> dict[str, list[Example]]:
    # rt-polarity, subj and TREC are Latin-1 era files: cp1252 decodes all their bytes.
    return split_single(
        "mr", label_lines("mr", "rt-polarity.all", REVIEW, SENTIMENT, "cp1252")
    )


def subj() -> dict[str, list[Example]]:
    template = "Sentence: {text}\nIs this sentence subjective or objective?\nAnswer:"
    return split_single(
        "subj", label_lines("subj", "subj.all", template, SUBJECTIVITY, "cp1252")
    )


def mpqa() -> dict[str, list[Example]]:
    template = "Phrase: {text}\nSentiment:"
    return split_single("mpqa", label_lines("mpqa", "mpqa.all", template, SENTIMENT))


def trec() -> dict[str, list[Example]]:
    template = (
        "Question: {text}\nIs this question asking for a description, an entity, "
        "an abbreviation, a person, a location or a number?\nAnswer:"
    )
    parts = {
        split: label_lines("trec", f"TREC.{split}.all", template, TREC, "cp1252")
        for split in ("train", "test")
    }
    return complete_splits("trec", parts)


def agnews() -> dict[str, list[Example]]:
    def read(filename: str) -> list[Example]:
        def convert(line: str) -> Example:
            text, label = line.split("\t")
            # AG News marks line breaks inside an article with a backslash.
            article = clean(text.replace("\\", " "))
            return Example(
                f"Article: {article}\nTopic:", AGNEWS, AGNEWS_LABELS.index(label)
            )

        return read_rows(data_file("agnews", filename), convert)

    return complete_splits(
        "agnews", {"train": read("train.tsv"), "test": read("test.tsv")}
    )


def cola() -> dict[str, list[Example]]:
    template = "Sentence: {text}\nIs this sentence grammatically correct?\nAnswer:"

    def read(filename: str) -> list[Example]:
        def convert(line: str) -> Example:
            _source, label, _annotation, sentence = line.split("\t")
            return Example(template.format(text=clean(sentence)), YES_NO, int(label))

        return read_rows(data_file("cola", filename), convert)

    # GLUE's CoLA dev set is the in-domain plus the out-of-domain dev files.
    test = read("in_domain_dev.tsv") + read("out_of_domain_dev.tsv")
    return complete_splits("cola", {"train": read("in_domain_train.tsv"), "test": test})


def _register(
    name: str,
    family: str,
    choices: tuple[str, ...],
    loader: Callable[[], dict[str, list[Example]]],
    metrics: tuple[str, ...] = ("accuracy",),
) -> None:
    register_task(Task(name, family, len(choices), metrics, loader))


_register("sst2", "sentiment", SENTIMENT, sst2)
_register("sst5", "sentiment", SST5, sst5)
_register("mr", "sentiment", SENTIMENT, mr)
_register("subj", "subjectivity", SUBJECTIVITY, subj)
_register("mpqa", "sentiment", SENTIMENT, mpqa)
_register("trec", "question_type", TREC, trec)
_register("agnews", "topic", AGNEWS, agnews)
_register("cola", "acceptability", YES_NO, cola, ("mcc", "accuracy"))
