//! How listeners are doing, told from the delivering node to a node standing by, whose
//! operator's page asks ([`Note::Asking`]). The delivering node writes its dispatcher's view
//! as lines, one per listener, in notes of at most [`NOTE_BYTES`]; the asking node puts them
//! back together. This module owns that text and the putting together; it never waits, and
//! never reads or writes the store.

use std::time::Duration;

use super::ListenerStatus;
use crate::store::{NOTE_BYTES, Note};

/// Listeners one answer tells of at most: those doing worst first.
pub(super) const REPORTED_MAX: usize = 2_000;

/// How long a node standing by waits for the delivering node's answer before its page says
/// only that the other node knows.
pub(super) const ANSWER_WAIT: Duration = Duration::from_millis(1_500);

/// What the delivering node answered: how `total` listeners it holds anything of are doing,
/// of which `statuses` (all of them, or the [`REPORTED_MAX`] doing worst).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandingReport {
    pub statuses: Vec<ListenerStatus>,
    pub total: usize,
}

/// The notes of answer `report`: a first line with how many listeners there are, then one
/// line per listener told of, the worst first, cut into parts that each fit a note.
pub(super) fn notes(report: u64, mut statuses: Vec<ListenerStatus>) -> Vec<Note> {
    let total = statuses.len();
    statuses.sort_by_key(|status| (rank(status.standing), std::cmp::Reverse(status.failures)));
    let mut texts = vec![format!("{total}\n")];
    for status in statuses.iter().take(REPORTED_MAX) {
        let line = line(status);
        let last = texts.last_mut().expect("there is always a part");
        if last.len() + line.len() > NOTE_BYTES {
            texts.push(line);
        } else {
            last.push_str(&line);
        }
    }
    let parts = u32::try_from(texts.len()).expect("a bounded number of parts");
    (0..).zip(texts).map(|(part, text)| Note::Standing { report, part, parts, text }).collect()
}

/// Worst first: failing, slow, unproven, healthy.
fn rank(standing: &str) -> u8 {
    match standing {
        "failing" => 0,
        "slow" => 1,
        "unproven" => 2,
        _ => 3,
    }
}

/// The standings the dispatcher names, as the `'static` text [`ListenerStatus`] holds.
fn standing(text: &str) -> Option<&'static str> {
    ["unproven", "healthy", "slow", "failing"].into_iter().find(|known| *known == text)
}

/// `id standing failures backed-off-until in-flight waiting detached-from`, `-` for none.
fn line(status: &ListenerStatus) -> String {
    let or_dash = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |value| value.to_string());
    format!(
        "{} {} {} {} {} {} {}\n",
        status.listener_id,
        status.standing,
        status.failures,
        or_dash(status.backed_off_until_ms),
        status.in_flight,
        status.waiting,
        or_dash(status.detached_from_seq)
    )
}

fn parse(line: &str) -> Option<ListenerStatus> {
    let mut words = line.split(' ');
    let mut next = || words.next();
    let optional = |word: &str| if word == "-" { Some(None) } else { word.parse().ok().map(Some) };
    let status = ListenerStatus {
        listener_id: next()?.to_owned(),
        standing: standing(next()?)?,
        failures: next()?.parse().ok()?,
        backed_off_until_ms: optional(next()?)?,
        in_flight: next()?.parse().ok()?,
        waiting: next()?.parse().ok()?,
        detached_from_seq: optional(next()?)?,
    };
    next().is_none().then_some(status)
}

/// An answer being put back together from its notes, which arrive in order. A part that
/// does not follow the one before (the asking node began listening halfway through an
/// answer, or the delivering node changed) drops what was gathered; a first part starts
/// afresh.
#[derive(Debug, Default)]
pub(super) struct Gathering {
    /// Answer, the part expected next, what its parts said so far.
    current: Option<(u64, u32, StandingReport)>,
}

impl Gathering {
    /// Takes in one part; the whole answer once its last part is in.
    pub fn heard(&mut self, report: u64, part: u32, parts: u32, text: &str) -> Option<StandingReport> {
        let mut lines = text.lines();
        if part == 0 {
            let total = lines.next().and_then(|total| total.parse().ok());
            self.current = total.map(|total| (report, 0, StandingReport { statuses: Vec::new(), total }));
        }
        let (gathering, expected, gathered) = self.current.as_mut()?;
        if (*gathering, *expected) != (report, part) {
            self.current = None;
            return None;
        }
        gathered.statuses.extend(lines.filter_map(parse));
        *expected += 1;
        if *expected < parts {
            return None;
        }
        self.current.take().map(|(_, _, report)| report)
    }

    /// Forgets a partial answer (nobody waits for it any more).
    pub fn clear(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(n: usize, standing: &'static str, failures: u32) -> ListenerStatus {
        ListenerStatus {
            listener_id: format!("lst_{n:026}"),
            standing,
            failures,
            backed_off_until_ms: (failures > 0).then_some(1_765_000_000_000 + n as u64),
            in_flight: n % 8,
            waiting: n,
            detached_from_seq: n.is_multiple_of(3).then_some(n as u64 * 1_000),
        }
    }

    fn gather(notes: Vec<Note>) -> Option<StandingReport> {
        let mut gathering = Gathering::default();
        let mut whole = None;
        for note in notes {
            let Note::Standing { report, part, parts, text } = note else { panic!("{note:?}") };
            assert!(text.len() <= NOTE_BYTES, "each part fits a note");
            assert!(whole.is_none(), "nothing after the last part");
            whole = gathering.heard(report, part, parts, &text);
        }
        whole
    }

    #[test]
    fn an_answer_reads_back_as_told_worst_first() {
        let statuses =
            vec![status(1, "healthy", 0), status(2, "failing", 3), status(3, "slow", 0), status(4, "failing", 9)];
        let report = gather(notes(5, statuses)).expect("one part, read whole");
        assert_eq!(report.total, 4);
        let order: Vec<(&str, u32)> = report.statuses.iter().map(|status| (status.standing, status.failures)).collect();
        assert_eq!(order, [("failing", 9), ("failing", 3), ("slow", 0), ("healthy", 0)]);
        assert_eq!(report.statuses[0], status(4, "failing", 9), "every field as told");
        assert_eq!(gather(notes(6, Vec::new())), Some(StandingReport { statuses: Vec::new(), total: 0 }));
    }

    #[test]
    fn a_long_answer_is_cut_into_parts_and_bounded() {
        let statuses: Vec<ListenerStatus> = (0..REPORTED_MAX + 500).map(|n| status(n, "unproven", 0)).collect();
        let notes = notes(1, statuses);
        assert!(notes.len() > 10, "{} parts", notes.len());
        let report = gather(notes).expect("read whole");
        assert_eq!(report.total, REPORTED_MAX + 500);
        assert_eq!(report.statuses.len(), REPORTED_MAX);
    }

    #[test]
    fn parts_out_of_order_or_without_their_start_give_nothing() {
        let statuses: Vec<ListenerStatus> = (0..300).map(|n| status(n, "slow", 1)).collect();
        let parts = notes(2, statuses.clone());
        assert!(parts.len() >= 3);
        // Heard from the second part on: the tail of an answer asked by someone else.
        assert_eq!(gather(parts[1..].to_vec()), None);
        // A part lost in the middle.
        let mut holed = parts.clone();
        holed.remove(1);
        assert_eq!(gather(holed), None);
        // The tail of one answer, then a whole other one: the other one.
        let mut tail_then_whole = parts[1..].to_vec();
        tail_then_whole.extend(notes(3, statuses[..10].to_vec()));
        assert_eq!(gather(tail_then_whole).map(|report| report.total), Some(10));
    }

    #[test]
    fn a_line_that_does_not_parse_is_left_out() {
        assert_eq!(
            parse("lst_a failing 1 - 0 0 -"),
            Some(ListenerStatus {
                listener_id: "lst_a".into(),
                standing: "failing",
                failures: 1,
                backed_off_until_ms: None,
                in_flight: 0,
                waiting: 0,
                detached_from_seq: None,
            })
        );
        for bad in [
            "lst_a sleepy 1 - 0 0 -",
            "lst_a failing 1 - 0 0",
            "lst_a failing 1 - 0 0 - extra",
            "lst_a failing x - 0 0 -",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
