"""The event streams as objects: what each one says, and that the poller needs nothing more."""

from __future__ import annotations

from exporter.model import SPACES, US, Rules, UsageModel
from exporter.records import ShinySession, Visit
from exporter.streams import SHINY, STREAMS, VISITS

T0 = 1_700_000_000 * US


def test_every_stream_has_its_own_name_and_key_space() -> None:
    names = [s.name for s in STREAMS]
    assert len(set(names)) == len(names)
    assert set(names) <= set(SPACES.values())


def test_sort_keys_and_reach_back() -> None:
    session = ShinySession("c", "u", T0 + 5, T0 + 9, 1)
    visit = Visit("c", "u", T0 + 7, None, None, None, None, None, 1)
    assert SHINY.sort_key(session) == T0 + 5  # by start: Connect pages sessions that way
    assert VISITS.sort_key(visit) == T0 + 7
    assert SHINY.reaches_back and not VISITS.reaches_back


def test_apply_and_finish_go_to_the_model() -> None:
    model = UsageModel(Rules(overlap_us=0, max_session_age_us=3600 * US))
    model.start_counting(T0, [s.name for s in STREAMS])
    walk = model.walk_tally("shiny")
    SHINY.apply(model, [ShinySession("c", "u", T0 + US, None, 1)], walk, T0 + 2 * US)
    VISITS.apply(
        model,
        [Visit("d", "u", T0 + US, None, None, None, None, None, 1)],
        model.walk_tally("visits"),
        T0 + 2 * US,
    )
    view = model.view(T0 / US + 2)
    assert view.shiny_sessions_total == {"c": 1} and view.content_visits_total == {"d": 1}
    SHINY.finish(model, model.walk_tally("shiny"), T0 + 2 * 3600 * US)  # not listed again
    assert model.view(T0 / US + 7200).shiny_sessions_abandoned_total == {"c": 1}
    VISITS.finish(model, model.walk_tally("visits"), T0)  # nothing to finish
