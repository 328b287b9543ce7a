from edge_mmm.speech_out.sentences import SentenceSplitter


def _split(deltas, first_clause_words=4):
    s = SentenceSplitter(first_clause_words=first_clause_words, first_words=0)
    out = []
    for d in deltas:
        out += s.feed(d)
    return out, s.flush()


def test_sentences_complete_as_tokens_arrive():
    s = SentenceSplitter(first_clause_words=0, first_words=0)
    assert s.feed("Hello the") == []
    assert s.feed("re. How") == ["Hello there."]
    assert s.feed(" are you?") == []  # no whitespace after "?" yet: the answer may go on
    assert s.feed(" Fine!\nNext") == ["How are you?", "Fine!"]
    assert s.flush() == ["Next"] and s.flush() == []


def test_numbers_and_abbreviations_do_not_end_a_sentence():
    done, rest = _split(["It is 3.5 km ", "from Dr. Smith's house, ", "e.g. near St. Paul. Go", " now."], 0)
    assert done == ["It is 3.5 km from Dr. Smith's house, e.g. near St. Paul."]
    assert rest == ["Go now."]


def test_a_long_clause_is_spoken_at_its_last_comma():
    s = SentenceSplitter(max_chars=40, first_clause_words=0, first_words=0)
    out = s.feed("one two three four five, six seven eight nine ten eleven")
    assert out == ["one two three four five,"]
    assert s.flush() == ["six seven eight nine ten eleven"]


def test_reset_forgets_the_unfinished_sentence():
    s = SentenceSplitter()
    s.feed("half a sent")
    s.reset()
    assert s.feed("ence. ") == ["ence."]


def test_an_answers_first_clause_is_spoken_before_its_sentence_ends():
    s = SentenceSplitter(first_clause_words=4, first_words=0)
    assert s.feed("Yes, I") == []  # too short a clause to say alone
    assert s.feed(" can see a red car, parked") == ["Yes, I can see a red car,"]
    assert s.feed(" by the road, next to it. Then") == ["parked by the road, next to it."]  # later: sentences
    assert s.flush() == ["Then"]
    assert s.feed("Sure, the next answer starts, again") == ["Sure, the next answer starts,"]


def test_an_answer_without_early_punctuation_starts_after_its_first_words():
    s = SentenceSplitter(first_clause_words=4, first_words=6)
    assert s.feed("The colour of the rain") == []
    assert s.feed("bow is") == []  # "is" may still grow: only words followed by a space count
    assert s.feed(" actually a rainbow") == ["The colour of the rainbow is"]
    assert s.feed(" itself. And") == ["actually a rainbow itself."]  # then whole sentences again
    assert s.flush() == ["And"]
