"""Preference data in `forja data`: pairs (DPO, ORPO) in TRL's and OpenAI's shapes and KTO's rated rows."""

import json

import pytest

from test_data import write, write_jsonl, write_parquet, write_xlsx

from forja.data import DataError, inspect, is_preference, prepare, read_rows

EXPECTED_PAIR = {"prompt": [{"role": "user", "content": "¿Horario?"}], "chosen": "De 7 a 14.", "rejected": "No sé."}


@pytest.mark.parametrize("make", [
    lambda d: write_jsonl(d / "p.jsonl", [{"prompt": "¿Horario?", "chosen": "De 7 a 14.", "rejected": "No sé."}]),
    lambda d: write_jsonl(d / "p.jsonl", [{"prompt": [{"role": "user", "content": "¿Horario?"}],
                                           "chosen": [{"role": "assistant", "content": "De 7 a 14."}],
                                           "rejected": [{"role": "assistant", "content": "No sé."}]}]),
    lambda d: write_jsonl(d / "openai.jsonl", [{"input": {"messages": [{"role": "user", "content": "¿Horario?"}]},
                                                "preferred_output": [{"role": "assistant", "content": "De 7 a 14."}],
                                                "non_preferred_output": [{"role": "assistant", "content": "No sé."}]}]),
    lambda d: write(d / "p.csv", "prompt,chosen,rejected\n¿Horario?,De 7 a 14.,No sé.\n"),
    lambda d: write_xlsx(d / "p.xlsx", {"Pares": [["Prompt", "Chosen", "Rejected"], ["¿Horario?", "De 7 a 14.", "No sé."]]}),
    lambda d: write_parquet(d / "p.parquet", {"prompt": ["¿Horario?"], "chosen": ["De 7 a 14."], "rejected": ["No sé."]}),
], ids=["jsonl text", "jsonl conversational", "openai preference", "csv", "xlsx", "parquet"])
def test_preference_pairs_are_read_from_every_file_type_into_one_shape(tmp_path, make):
    path = make(tmp_path)
    summary = prepare([path], tmp_path / "out" / "prefs.jsonl")
    rows = read_rows(summary.train_path)
    assert [{k: v for k, v in r.items() if k != "source"} for r in rows] == [EXPECTED_PAIR]
    assert summary.kinds["preference"] == 1 and is_preference(rows[0])
    assert "1 preference rows" in summary.render()


def test_rated_rows_are_kto_rows_not_prompt_completion_pairs(tmp_path):
    path = write(tmp_path / "ratings.csv", "prompt,completion,label\nHola,Buenos días.,true\nHola,Hello.,0\n"
                 "¿Precio?,Dos euros.,down\n")
    report = inspect([path])
    assert "completion/label → preference: 3 rows" in report.render()
    rows = read_rows(prepare([path], tmp_path / "k.jsonl").train_path)
    assert [(r["completion"], r["label"]) for r in rows] == [("Buenos días.", True), ("Hello.", False), ("Dos euros.", False)]
    plain = write(tmp_path / "plain.csv", "prompt,completion\nHola,Buenos días.\n")
    assert "messages" in read_rows(prepare([plain], tmp_path / "plain.jsonl").train_path)[0]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hola", "completion": "Hi.", "label": "maybe"},
     'p.jsonl row 1: field "label" is "maybe"; expected true (a good answer) or false (a bad one)'),
    ({"prompt": "Hola", "chosen": "", "rejected": "Hi."}, 'p.jsonl row 1: field "chosen" is empty'),
    ({"prompt": "Hola", "chosen": "Hi.", "rejected": "Hi."}, 'the same answer; the pair teaches nothing'),
    ({"prompt": [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Hi."}], "chosen": "a",
      "rejected": "b"}, "\"prompt\" turn 2: a prompt ends with the user's turn, not the assistant's"),
    ({"prompt": "Hola", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": "b"}, 'field "chosen" must be text or a list of one {"role": "assistant", "content": ...} turn'),
    ({"input": {"text": "Hola"}, "preferred_output": "a", "non_preferred_output": "b"},
     'field "input" must be an object with "messages"'),
])
def test_bad_preference_rows_name_the_file_row_field_and_fix(tmp_path, row, message):
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(DataError) as error:
        prepare([path], tmp_path / "out.jsonl")
    assert message in str(error.value) and "--skip-bad" in str(error.value) and "\n" not in str(error.value)


def test_a_system_prompt_goes_first_in_the_prompt_and_preference_rows_are_split_like_others(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    summary = prepare([path], tmp_path / "out.jsonl", val_fraction=0.25, system="Sé breve.")
    train, val = read_rows(summary.train_path), read_rows(summary.val_path)
    assert (len(train), len(val)) == (15, 5)
    assert all(r["prompt"][0] == {"role": "system", "content": "Sé breve."} for r in train + val)
    assert json.loads(summary.meta_path.read_text())["kinds"]["preference"] == 20
