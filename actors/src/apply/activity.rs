//! The counted interactions: page views, cart changes, support tickets, email engagement,
//! store visits and consent. Each only updates its counters in the customer state (no
//! points, no actor events) and returns the timeline summary. Called by
//! [`super::event::apply_event`] for every kind without rules of its own.

use crate::ingest::{CartAction, ChannelEvent, EmailAction, EventKind, SupportStatus};
use crate::money::Money;
use crate::state::{Consent, CustomerState, OPEN_TICKETS_MAX};

/// Applies a view, cart, support, email, visit or consent event; returns its summary.
pub(super) fn apply_activity(state: &mut CustomerState, event: &ChannelEvent) -> String {
    let at = event.occurred_at_ms;
    match &event.kind {
        EventKind::View { sku, category } => {
            state.browsing.views += 1;
            if category.is_some() {
                state.browsing.last_viewed_category = category.clone();
            }
            state.browsing.last_at_ms = state.browsing.last_at_ms.max(Some(at));
            match (sku, category) {
                (Some(sku), Some(category)) => format!("viewed {sku} ({category})"),
                (Some(sku), None) => format!("viewed {sku}"),
                (None, Some(category)) => format!("viewed category {category}"),
                (None, None) => "viewed a page".to_string(),
            }
        }
        EventKind::Cart {
            action,
            sku,
            qty,
            price_minor,
            ..
        } => {
            state.browsing.last_at_ms = state.browsing.last_at_ms.max(Some(at));
            match action {
                CartAction::Add => {
                    state.browsing.cart_adds += 1;
                    format!("added {qty} x {sku} ({}) to cart", Money(*price_minor))
                }
                CartAction::Remove => {
                    state.browsing.cart_removes += 1;
                    format!("removed {qty} x {sku} from cart")
                }
            }
        }
        EventKind::Support {
            ticket_id,
            status,
            satisfaction,
        } => {
            let support = &mut state.support;
            support.last_at_ms = support.last_at_ms.max(Some(at));
            match status {
                SupportStatus::Opened => {
                    support.opened += 1;
                    if support.open_tickets.len() < OPEN_TICKETS_MAX {
                        support.open_tickets.insert(ticket_id.clone());
                    }
                    format!("ticket {ticket_id} opened")
                }
                SupportStatus::Resolved => {
                    support.resolved += 1;
                    support.open_tickets.remove(ticket_id);
                    if let Some(score) = satisfaction {
                        support.satisfaction_sum += u64::from(*score);
                        support.satisfaction_count += 1;
                        format!("ticket {ticket_id} resolved, satisfaction {score}/5")
                    } else {
                        format!("ticket {ticket_id} resolved")
                    }
                }
            }
        }
        EventKind::Email { action, campaign } => {
            let email = &mut state.email;
            let verb = match action {
                EmailAction::Sent => {
                    email.sent += 1;
                    "sent"
                }
                EmailAction::Opened => {
                    email.opened += 1;
                    email.last_engaged_at_ms = email.last_engaged_at_ms.max(Some(at));
                    "opened"
                }
                EmailAction::Clicked => {
                    email.clicked += 1;
                    email.last_engaged_at_ms = email.last_engaged_at_ms.max(Some(at));
                    "clicked"
                }
            };
            email.last_campaign = Some(campaign.clone());
            format!("email {campaign} {verb}")
        }
        EventKind::Visit { store_id } => {
            let visits = &mut state.visits;
            visits.count += 1;
            if !matches!(visits.last_at_ms, Some(last) if at < last) {
                visits.last_at_ms = Some(at);
                visits.last_store_id = store_id.clone();
            }
            match store_id {
                Some(store) => format!("visited store {store}"),
                None => "visited a store".to_string(),
            }
        }
        EventKind::Consent { purpose, granted } => {
            let newer = state
                .consents
                .get(purpose)
                .is_none_or(|existing| at >= existing.at_ms);
            if newer {
                state.consents.insert(
                    purpose.clone(),
                    Consent {
                        granted: *granted,
                        at_ms: at,
                        channel: event.channel.clone(),
                    },
                );
            }
            format!(
                "consent {purpose} {}",
                if *granted { "granted" } else { "withdrawn" }
            )
        }
        EventKind::Purchase(_) | EventKind::Return(_) | EventKind::Identify { .. } => {
            unreachable!("apply_kind routes {} elsewhere", event.kind.type_name())
        }
    }
}
