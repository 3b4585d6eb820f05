import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchv4 import SamplingParams
from batchv4.engine.detokenizer import IncrementalDetokenizer, StopDecision

BOS, EOS = 0, 1
SPECIAL = {BOS: "<s>", EOS: "</s>"}
# "中" is e4 b8 ad, "文" is e6 96 87: some pieces end or start inside a character.
PIECES = [
    b"Hel", b"lo", b" ", b"wor", b"ld", b"!", b"ST", b"OP", b"S", b"TOP", b"\n", b"x",
    b"\xe4\xb8", b"\xad", b"\xe4", b"\xb8\xad", b"\xe6\x96\x87", b"P\xe4", b"\x80", b"lo ST", b"OPx",
]
VOCAB = {i + 2: piece for i, piece in enumerate(PIECES)}
ID = {piece: i for i, piece in VOCAB.items()}


class FakeTokenizer:
    """Byte-level like V4: each id is a fixed byte string; decoding replaces invalid UTF-8."""

    eos_id = EOS
    vocab_size = len(VOCAB) + 2

    def decode(self, ids, skip_special_tokens=False):
        out = bytearray()
        for i in ids:
            if i in SPECIAL:
                if not skip_special_tokens:
                    out += SPECIAL[i].encode()
            else:
                out += VOCAB[i]
        return out.decode("utf-8", errors="replace")


def ids(*pieces):
    return [ID[p] for p in pieces]


def run(pieces_or_ids, **kw):
    kw.setdefault("max_tokens", 100)
    d = IncrementalDetokenizer(FakeTokenizer(), SamplingParams(**kw), EOS, prompt_tail=[BOS])
    decision = None
    for t in pieces_or_ids:
        tid = t if isinstance(t, int) else ID[t]
        decision = d.append(tid)
        if decision is not None:
            break
    return d, decision


def test_plain_text_and_token_ids():
    d, decision = run([b"Hel", b"lo", b" ", b"wor", b"ld"])
    assert decision is None and not d.finished
    assert d.text == "Hello world" and d.token_ids == ids(b"Hel", b"lo", b" ", b"wor", b"ld")


def test_stop_string_spanning_tokens():
    d, decision = run([b"Hel", b"lo", b" ", b"ST", b"OP", b"x"], stop=["STOP"])
    assert decision == StopDecision("stop", "STOP")
    assert d.text == "Hello " and d.token_ids == ids(b"Hel", b"lo", b" ", b"ST", b"OP")
    d, _ = run([b"Hel", b"lo", b" ", b"ST", b"OP"], stop=["STOP"], include_stop_str_in_output=True)
    assert d.text == "Hello STOP"


def test_stop_string_inside_and_across_token_edges():
    d, decision = run([b"Hel", b"lo ST", b"OPx", b"x"], stop="STOP")
    assert decision == StopDecision("stop", "STOP") and d.text == "Hello " and len(d.token_ids) == 3
    d, _ = run([b"Hel", b"lo ST", b"OPx"], stop="STOP", include_stop_str_in_output=True)
    assert d.text == "Hello STOP"


def test_earliest_completed_stop_string_wins():
    d, decision = run([b"S", b"TOP"], stop=["STOP", "TO"])
    assert decision.stop_reason == "TO" and d.text == "S"
    d, decision = run([b"lo ST", b"OPx"], stop=["OPx", "STOP"])
    assert decision.stop_reason == "STOP" and d.text == "lo "


def test_stop_token_id_is_not_in_text():
    d, decision = run([b"Hel", b"lo", b"!", b"x"], stop_token_ids=[ID[b"!"]])
    assert decision == StopDecision("stop", ID[b"!"])
    assert d.text == "Hello" and d.token_ids[-1] == ID[b"!"]
    d, _ = run([b"Hel", b"lo", b"!"], stop_token_ids=[ID[b"!"]], include_stop_str_in_output=True)
    assert d.text == "Hello!"


def test_eos_stops_unless_ignored():
    d, decision = run([ID[b"Hel"], EOS, ID[b"x"]])
    assert decision == StopDecision("stop", None) and d.text == "Hel" and d.token_ids == [ID[b"Hel"], EOS]
    d, decision = run([ID[b"Hel"], EOS, ID[b"x"]], ignore_eos=True)
    assert decision is None and d.text == "Helx" and len(d.token_ids) == 3
    d, _ = run([ID[b"Hel"], EOS, ID[b"x"]], ignore_eos=True, skip_special_tokens=False)
    assert d.text == "Hel</s>x"
    d, decision = run([ID[b"Hel"], EOS], ignore_eos=True, stop_token_ids=[EOS])
    assert decision == StopDecision("stop", EOS)


def test_max_tokens_gives_length_but_a_stop_on_the_last_token_wins():
    d, decision = run([b"Hel", b"lo", b" ", b"x"], max_tokens=3)
    assert decision == StopDecision("length", None) and d.text == "Hello " and len(d.token_ids) == 3
    _, decision = run([ID[b"Hel"], EOS], max_tokens=2)
    assert decision == StopDecision("stop", None)
    _, decision = run([b"ST", b"OP"], max_tokens=2, stop="STOP")
    assert decision == StopDecision("stop", "STOP")


def test_append_after_finish_raises():
    d, _ = run([b"x"], max_tokens=1)
    with pytest.raises(RuntimeError, match="after the sample finished"):
        d.append(ID[b"x"])


def test_multibyte_character_split_across_tokens():
    d = IncrementalDetokenizer(FakeTokenizer(), SamplingParams(max_tokens=10), EOS)
    d.append(ID[b"x"])
    d.append(ID[b"\xe4\xb8"])
    assert d.text == "x"  # no replacement character while the character is incomplete
    d.append(ID[b"\xad"])
    assert d.text == "x中"
    d.append(ID[b"P\xe4"])
    assert d.text == "x中P"  # the complete part of a token is emitted at once
    d.append(ID[b"\xb8\xad"])
    assert d.text == "x中P中"


def test_stop_string_before_a_split_character_is_seen_at_once():
    d, decision = run([b"ST", b"OP", b"\xe4"], stop="STOP")
    assert decision.stop_reason == "STOP" and len(d.token_ids) == 2
    d, decision = run([b"S", b"TOP", b"ST", b"P\xe4", b"\xb8\xad"], stop="STP")
    assert decision.stop_reason == "STP" and d.text == "STOP" and len(d.token_ids) == 4


def test_length_inside_a_character_drops_the_partial_bytes():
    d, decision = run([b"x", b"\xe4\xb8"], max_tokens=2)
    assert decision.finish_reason == "length" and d.text == "x"
    d, decision = run([b"x", b"\xe4", EOS])
    assert decision.finish_reason == "stop" and d.text == "x"


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decode"):
        IncrementalDetokenizer(object(), SamplingParams(), EOS)
    with pytest.raises(ValueError, match="eos_id must be an integer"):
        IncrementalDetokenizer(FakeTokenizer(), SamplingParams(), None)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.sampled_from(sorted(VOCAB)), max_size=25))
def test_incremental_text_equals_full_decode(token_ids):
    d = IncrementalDetokenizer(FakeTokenizer(), SamplingParams(max_tokens=len(token_ids) + 1), EOS)
    for t in token_ids:
        assert d.append(t) is None
        assert not d.text.endswith("\ufffd")
    full = FakeTokenizer().decode(token_ids)
    # Only the trailing incomplete character may be held back.
    assert full.startswith(d.text) and set(full[len(d.text) :]) <= {"\ufffd"}


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.sampled_from(sorted(VOCAB)), max_size=25), st.sampled_from(["STOP", "lo", "中", "x\n"]))
def test_stop_string_matches_reference(token_ids, stop):
    d, decision = run(token_ids, stop=stop, max_tokens=len(token_ids) + 1)
    # Reference: the first prefix of tokens whose decoded text (without an incomplete tail) holds
    # the stop string.
    for n in range(1, len(token_ids) + 1):
        text = FakeTokenizer().decode(token_ids[:n]).rstrip("\ufffd")
        if stop in text:
            assert decision == StopDecision("stop", stop) and len(d.token_ids) == n
            assert d.text == text[: text.index(stop)]
            return
    assert decision is None


def test_real_v4_tokenizer_round_trip():
    from batchv4.tokenizer import load_tokenizer  # a hard dependency: a missing install must fail here

    tok = load_tokenizer()
    text = "Hello wörld, 中文 龘靐齉 🫠🫡 𝔘𝔫𝔦 done. END of text"
    out = tok.encode(text)
    prompt = tok.encode("<｜User｜>hi<｜Assistant｜></think>")
    params = SamplingParams(max_tokens=500, stop="END")
    d = IncrementalDetokenizer(tok, params, tok.eos_id, prompt_tail=prompt[-5:])
    for t in out:
        assert not d.text.endswith("\ufffd")
        if d.append(t) is not None:
            break
    assert d.text == "Hello wörld, 中文 龘靐齉 🫠🫡 𝔘𝔫𝔦 done. " and d.decision == StopDecision("stop", "END")
    d = IncrementalDetokenizer(tok, SamplingParams(max_tokens=500), tok.eos_id)
    for t in out + [tok.eos_id]:
        decision = d.append(t)
    assert d.text == text and decision == StopDecision("stop", None) and d.token_ids[-1] == tok.eos_id
