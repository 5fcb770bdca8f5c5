//! What every backend's listings share: scan budgets, deliveries still waiting in the event
//! log, and merging a page of records with a page of those. Pure functions, no I/O.

use super::Page;
use super::model::{Delivery, Event};

/// Records looked at per page, at most, per item asked for.
const SCAN_PER_ITEM: usize = 20;
/// ...and never fewer than this.
const MIN_SCAN: usize = 1000;

/// How many records a page of `limit` items may look at: a filter that matches rarely never
/// turns one call into a full scan.
pub(crate) fn scan_budget(limit: usize) -> usize {
    limit.saturating_mul(SCAN_PER_ITEM).max(MIN_SCAN)
}

/// A delivery that has no record yet: its event's first attempt to `listener` is still to
/// come (waiting in the event log, or under way). It is pending, due since its event.
pub(crate) fn implicit(event: &Event, listener_id: &str) -> Delivery {
    Delivery::pending(crate::ids::delivery_id(event.seq, listener_id), event, listener_id, event.created_at_ms)
}

/// Merges two pages of deliveries in id order into one of at most `limit`. Each side may have
/// stopped early at a position (`resume`, the last id it looked at): the page then ends at the
/// nearer one, so nothing either side has not yet looked at is skipped.
pub(crate) fn merge_pages(
    mut items: Vec<Delivery>,
    more: Vec<Delivery>,
    stops: [Option<String>; 2],
    limit: usize,
) -> Page<Delivery> {
    items.extend(more);
    items.sort_by(|a, b| a.id.cmp(&b.id));
    items.dedup_by(|a, b| a.id == b.id);
    let frontier = stops.into_iter().flatten().min();
    if let Some(frontier) = &frontier {
        items.retain(|delivery| delivery.id <= *frontier);
    }
    if items.len() > limit {
        items.truncate(limit);
        let last = items.last().map(|delivery| delivery.id.clone());
        return Page { items, resume_after: last };
    }
    Page { items, resume_after: frontier }
}
