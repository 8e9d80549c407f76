//! Typed methods: a [`Method`] names a call and fixes its argument and
//! result types for both sides; a worker's [`Methods`] maps names to
//! handlers.

use std::any::type_name;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::wire::FailKind;

/// Which workers send their result back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyFrom {
    /// Every worker; the executor returns the results in rank order.
    All,
    /// Only this global rank (typically 0: the result of a forward pass
    /// that every rank computed together). The others only acknowledge,
    /// so their errors are still reported.
    Rank(usize),
}

/// A method callable on every worker: its name, argument type `A`, result
/// type `R`, and which workers reply. Declare it once, in code both the
/// driver and the worker program use, so both sides agree on the types:
///
/// ```
/// use executor::{Method, ReplyFrom};
/// /// Adds the worker's rank to the argument; every worker replies.
/// const ADD_RANK: Method<u64, u64> = Method::new("add_rank");
/// /// One generated sample, computed by all workers, returned by rank 0.
/// const GENERATE: Method<String, Vec<f32>> = Method::with_reply("generate", ReplyFrom::Rank(0));
/// assert_eq!(GENERATE.reply_from(), ReplyFrom::Rank(0));
/// assert_eq!(ADD_RANK.name(), "add_rank");
/// ```
pub struct Method<A, R> {
    name: Cow<'static, str>,
    reply: ReplyFrom,
    _types: PhantomData<fn(A) -> R>,
}

impl<A, R> Method<A, R> {
    /// A method every worker replies to.
    pub const fn new(name: &'static str) -> Self {
        Self::with_reply(name, ReplyFrom::All)
    }

    /// A method with the given reply policy.
    pub const fn with_reply(name: &'static str, reply: ReplyFrom) -> Self {
        Method {
            name: Cow::Borrowed(name),
            reply,
            _types: PhantomData,
        }
    }

    /// A method whose name is only known at run time.
    pub fn named(name: impl Into<String>, reply: ReplyFrom) -> Self {
        Method {
            name: Cow::Owned(name.into()),
            reply,
            _types: PhantomData,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which workers reply.
    pub fn reply_from(&self) -> ReplyFrom {
        self.reply
    }
}

impl<A, R> Clone for Method<A, R> {
    fn clone(&self) -> Self {
        Method {
            name: self.name.clone(),
            reply: self.reply,
            _types: PhantomData,
        }
    }
}

impl<A, R> fmt::Debug for Method<A, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Method")
            .field("name", &self.name)
            .field("args", &type_name::<A>())
            .field("result", &type_name::<R>())
            .field("reply", &self.reply)
            .finish()
    }
}

/// A failed call on a worker, as reported to the executor.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) kind: FailKind,
    pub(crate) message: String,
}

/// One step of a call on a handler.
pub(crate) enum Step<'a> {
    /// Decode the argument bytes and keep the value for [`Step::Run`]
    /// (the bytes may lie in the request ring, released right after).
    Decode(&'a [u8]),
    /// Run the handler on the kept argument; with `Some(out)`, append the
    /// encoded result to it.
    Run(Option<&'a mut Vec<u8>>),
}

/// A handler: decodes into its own slot, then runs on it.
type Handler<S> = Box<dyn FnMut(&mut S, Step<'_>) -> Result<(), Failure>>;

/// A call whose argument was decoded ([`Methods::decode`]), ready to run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decoded(usize);

/// The handlers of a worker, by method name, over user state `S` (the
/// model, built once at start-up).
///
/// ```
/// use executor::{Method, Methods};
/// const SCALE: Method<f32, ()> = Method::new("scale");
/// const SUM: Method<Vec<f32>, f32> = Method::new("sum");
/// struct Model { factor: f32 }
/// let mut m = Methods::<Model>::new();
/// m.on(&SCALE, |model, f| { model.factor *= f; Ok::<_, String>(()) })
///  .on(&SUM, |model, xs| Ok::<_, String>(xs.iter().sum::<f32>() * model.factor));
/// assert!(m.contains("sum"));
/// ```
pub struct Methods<S> {
    /// Name to index in `handlers`.
    index: HashMap<String, usize>,
    handlers: Vec<Handler<S>>,
    duplicates: Vec<String>,
}

impl<S> Default for Methods<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> fmt::Debug for Methods<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Methods")
            .field("names", &self.names())
            .finish()
    }
}

/// Runs `f`, turning a panic into a [`FailKind::Panic`] failure.
fn catching<T>(f: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let message = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-text payload".into());
        Err(Failure {
            kind: FailKind::Panic,
            message,
        })
    })
}

impl<S> Methods<S> {
    /// No methods.
    pub fn new() -> Self {
        Methods {
            index: HashMap::new(),
            handlers: Vec::new(),
            duplicates: Vec::new(),
        }
    }

    /// Registers `handler` for `method`. The handler gets the worker's
    /// state and the decoded argument; an `Err` is reported to the
    /// executor with this worker's rank, as is a panic (the worker keeps
    /// serving). Registering a name twice is reported as an initialisation
    /// error when the worker starts serving.
    pub fn on<A, R, E, F>(&mut self, method: &Method<A, R>, mut handler: F) -> &mut Self
    where
        // Kept between the decode and the run (see `Step`).
        A: DeserializeOwned + 'static,
        R: Serialize,
        E: fmt::Display,
        F: FnMut(&mut S, A) -> Result<R, E> + 'static,
    {
        let name = method.name().to_string();
        // The decoded argument waits here between the two steps.
        let mut slot: Option<A> = None;
        let entry: Handler<S> = Box::new(move |state, step| match step {
            Step::Decode(args) => {
                slot = Some(dist_utils::codec::decode(args).map_err(|e| Failure {
                    kind: FailKind::BadArgument,
                    message: format!(
                        "expected `{}`: {e}; do the driver and the worker use the same Method declaration?",
                        type_name::<A>()
                    ),
                })?);
                Ok(())
            }
            Step::Run(out) => {
                let a = slot.take().ok_or_else(|| Failure {
                    kind: FailKind::Error,
                    message: "internal: the call's argument was not decoded".into(),
                })?;
                let r = handler(state, a).map_err(|e| Failure {
                    kind: FailKind::Error,
                    message: e.to_string(),
                })?;
                if let Some(out) = out {
                    let buf = std::mem::take(out);
                    *out = postcard::to_extend(&r, buf).map_err(|e| Failure {
                        kind: FailKind::BadResult,
                        message: format!("`{}`: {e}", type_name::<R>()),
                    })?;
                }
                Ok(())
            }
        });
        match self.index.get(&name) {
            Some(&i) => {
                self.handlers[i] = entry;
                self.duplicates.push(name);
            }
            None => {
                self.index.insert(name, self.handlers.len());
                self.handlers.push(entry);
            }
        }
        self
    }

    /// True when `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Names registered more than once (an initialisation error).
    pub(crate) fn duplicates(&self) -> &[String] {
        &self.duplicates
    }

    /// The first step of a call of `name`: decodes the argument bytes
    /// `args` (catching panics), which need not outlive this call.
    pub(crate) fn decode(
        &mut self,
        state: &mut S,
        name: &str,
        args: &[u8],
    ) -> Result<Decoded, Failure> {
        let Some(&i) = self.index.get(name) else {
            return Err(Failure {
                kind: FailKind::UnknownMethod,
                message: format!(
                    "no method `{name}` is registered on this worker (registered: {})",
                    self.names().join(", ")
                ),
            });
        };
        let h = &mut self.handlers[i];
        catching(|| h(state, Step::Decode(args)))?;
        Ok(Decoded(i))
    }

    /// The second step: runs the decoded call on `state`, catching panics.
    /// With `out`, the encoded result is appended to it.
    pub(crate) fn run(
        &mut self,
        state: &mut S,
        call: Decoded,
        out: Option<&mut Vec<u8>>,
    ) -> Result<(), Failure> {
        let h = self.handlers.get_mut(call.0).ok_or_else(|| Failure {
            kind: FailKind::Error,
            message: "internal: no such handler".into(),
        })?;
        catching(|| h(state, Step::Run(out)))
    }
}
