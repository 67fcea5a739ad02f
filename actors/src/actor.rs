//! The customer actor: one ractor actor per *resident* customer (a virtual actor).
//!
//! The shard engine ([`crate::engine`]) activates an actor on a customer's first message
//! (state loaded from sled, or a new customer), sends it [`CustomerMessage::Apply`] for each
//! command in log order, and stops it when it passivates. The actor owns the customer's
//! [`CustomerState`] and the rules; it runs the pure [`apply::apply`] and answers with the
//! outcome plus, when the state changed, its new codec bytes and next due time for the
//! engine's group commit. It never writes to sled itself, never reads the wall clock and
//! never knows which node or shard it lives on. Actors are spawned without a name: ractor's
//! global registry is not used; the engine keeps the handles.

use crate::apply;
use crate::codec::{self, CodecError};
use crate::rules::Rules;
use crate::shard_message::{ApplyOutcome, CustomerCommand};
use crate::state::CustomerState;
use crate::store::EncodedState;
use crate::value::live::ValueModel;
use crate::view;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr};
use std::sync::Arc;

/// What the actor answers to [`CustomerMessage::Apply`].
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub outcome: ApplyOutcome,
    /// The state to store: `Some` when the customer exists and its state changed, and after
    /// every tick (so that the engine rewrites its timer entry).
    pub changed: Option<EncodedState>,
}

/// Messages a customer actor handles, in mailbox order.
// ractor boxes every message on send, so the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum CustomerMessage {
    /// Apply one command; the reply fails only if the new state cannot be encoded.
    Apply {
        command: CustomerCommand,
        reply: RpcReplyPort<Result<Applied, CodecError>>,
    },
    /// The 360 view as of `as_of_ms` (event time); `None` if the customer does not exist.
    View {
        as_of_ms: i64,
        /// The current customer-value model, for the view's `value` block.
        value_model: Option<Arc<ValueModel>>,
        reply: RpcReplyPort<Option<serde_json::Value>>,
    },
    /// Use these rules for every later command (rules hot-swap).
    SetRules(Arc<Rules>),
}

/// The actor's behaviour (stateless; the state is [`CustomerActorState`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct CustomerActor;

/// What a customer actor owns while resident.
#[derive(Debug)]
pub struct CustomerActorState {
    pub state: CustomerState,
    /// The codec bytes of `state` as last stored (empty: never stored). A command changed
    /// the state exactly when its new encoding differs from these bytes.
    pub stored_bytes: Vec<u8>,
    pub rules: Arc<Rules>,
}

impl Actor for CustomerActor {
    type Msg = CustomerMessage;
    type State = CustomerActorState;
    type Arguments = CustomerActorState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        arguments: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(arguments)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        actor: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            CustomerMessage::Apply { command, reply } => {
                let _span =
                    tracing::debug_span!("customer", customer_id = %actor.state.customer_id)
                        .entered();
                let answer = apply_command(actor, &command);
                // The engine dropped its receiver only if it gave up on the batch.
                let _ = reply.send(answer);
            }
            CustomerMessage::View {
                as_of_ms,
                value_model,
                reply,
            } => {
                let view = actor.state.exists().then(|| {
                    view::full_view(&actor.state, as_of_ms, &actor.rules, value_model.as_deref())
                });
                let _ = reply.send(view);
            }
            CustomerMessage::SetRules(rules) => actor.rules = rules,
        }
        Ok(())
    }
}

/// Applies `command` and reports whether the stored form must change.
fn apply_command(
    actor: &mut CustomerActorState,
    command: &CustomerCommand,
) -> Result<Applied, CodecError> {
    let outcome = apply::apply(&mut actor.state, command, &actor.rules);
    if !actor.state.exists() {
        return Ok(Applied {
            outcome,
            changed: None,
        });
    }
    let bytes = codec::try_encode(&actor.state)?;
    // A tick always reports the state: the engine ticked this customer because the timer
    // index said it was due, and the index must move even when the rules changed nothing.
    let is_tick = matches!(command, CustomerCommand::Tick { .. });
    let changed = if bytes == actor.stored_bytes && !is_tick {
        None
    } else {
        actor.stored_bytes.clone_from(&bytes);
        Some(EncodedState {
            bytes,
            next_due_ms: actor.state.next_due_ms(),
        })
    };
    Ok(Applied { outcome, changed })
}

/// Spawns an unnamed customer actor owning `state`, whose stored form is `stored_bytes`
/// (empty for a customer not in the store).
pub async fn spawn_customer(
    state: CustomerState,
    stored_bytes: Vec<u8>,
    rules: Arc<Rules>,
) -> Result<(ActorRef<CustomerMessage>, JoinHandle<()>), SpawnErr> {
    Actor::spawn(
        None,
        CustomerActor,
        CustomerActorState {
            state,
            stored_bytes,
            rules,
        },
    )
    .await
}
