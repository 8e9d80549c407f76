//! Typed methods: a [`Method`] names a call and fixes its argument and
//! result types for both sides; a worker's [`Methods`] maps names to
//! handlers.

use std::any::type_name;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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

/// An argument type with a borrowed form that decodes from the same bytes,
/// so a handler registered with [`Methods::on_view`] reads the argument
/// where it lies (in the shared-memory request ring on one host) instead
/// of getting its own copy. A 16 MiB tensor sent to 4 local workers is then
/// written once by the driver and copied by nobody unless the handler
/// copies it (say, straight into its device buffer).
///
/// Implement it for your own request types with a borrowed twin whose
/// fields encode the same way (`String` / `&str`, `Vec<u8>` or
/// [`serde_bytes::ByteBuf`] / `&[u8]`, and so on, in the same order):
///
/// ```
/// use executor::ArgView;
/// use serde::{Deserialize, Serialize};
/// #[derive(Serialize)]
/// struct Prompt { text: String, latents: serde_bytes::ByteBuf }
/// #[derive(Deserialize)]
/// struct PromptView<'a> { text: &'a str, latents: &'a [u8] }
/// impl ArgView for Prompt { type View<'a> = PromptView<'a>; }
/// ```
pub trait ArgView: Serialize {
    /// The borrowed form a handler gets.
    type View<'a>: Deserialize<'a>;
}

impl ArgView for String {
    type View<'a> = &'a str;
}

/// Postcard encodes a `Vec<u8>` as its length and its bytes, as it does a
/// byte slice.
impl ArgView for Vec<u8> {
    type View<'a> = &'a [u8];
}

impl ArgView for serde_bytes::ByteBuf {
    type View<'a> = &'a [u8];
}

impl<A: ArgView, B: ArgView> ArgView for (A, B) {
    type View<'a> = (A::View<'a>, B::View<'a>);
}

impl<A: ArgView, B: ArgView, C: ArgView> ArgView for (A, B, C) {
    type View<'a> = (A::View<'a>, B::View<'a>, C::View<'a>);
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
    pub(crate) name: Cow<'static, str>,
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
    /// (the bytes may lie in the request ring, released right after). A
    /// handler registered with [`Methods::on_view`] runs here, on the
    /// bytes, and keeps its result.
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

/// Decodes a call's argument bytes as `T` (`A` or its view), reporting a
/// mismatch as a bad argument of type `A`.
fn decode_arg<'a, A, T: Deserialize<'a>>(args: &'a [u8]) -> Result<T, Failure> {
    dist_utils::codec::decode(args).map_err(|e| Failure {
        kind: FailKind::BadArgument,
        message: format!(
            "expected `{}`: {e}; do the driver and the worker use the same Method declaration?",
            type_name::<A>()
        ),
    })
}

/// A handler's error, as reported to the executor.
fn handler_failed(e: impl fmt::Display) -> Failure {
    Failure {
        kind: FailKind::Error,
        message: e.to_string(),
    }
}

/// A run step without its decode step before it.
fn not_decoded() -> Failure {
    Failure {
        kind: FailKind::Error,
        message: "internal: the call's argument was not decoded".into(),
    }
}

/// Appends the encoded result to `out`, if the caller wants it.
fn encode_result<R: Serialize>(r: &R, out: Option<&mut Vec<u8>>) -> Result<(), Failure> {
    if let Some(out) = out {
        let buf = std::mem::take(out);
        *out = postcard::to_extend(r, buf).map_err(|e| Failure {
            kind: FailKind::BadResult,
            message: format!("`{}`: {e}", type_name::<R>()),
        })?;
    }
    Ok(())
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
        // The decoded argument waits here between the two steps.
        let mut slot: Option<A> = None;
        self.insert(
            method.name(),
            Box::new(move |state, step| match step {
                Step::Decode(args) => {
                    slot = Some(decode_arg::<A, A>(args)?);
                    Ok(())
                }
                Step::Run(out) => {
                    let a = slot.take().ok_or_else(not_decoded)?;
                    let r = handler(state, a).map_err(handler_failed)?;
                    encode_result(&r, out)
                }
            }),
        )
    }

    /// Registers `handler` for `method`, to be called with the argument's
    /// borrowed form ([`ArgView::View`]) where it lies: on one host, in
    /// the shared-memory request ring every local worker reads, so a large
    /// argument is not copied into each worker. Errors and panics are
    /// reported as with [`Methods::on`].
    ///
    /// The request's bytes stay in the ring until the handler returns, so
    /// while it runs that much less of the ring is free for the driver's
    /// next requests: keep long work out of it, or copy what it needs.
    ///
    /// ```
    /// use executor::{Method, Methods};
    /// use serde_bytes::ByteBuf;
    /// const UPLOAD: Method<ByteBuf, u64> = Method::new("upload");
    /// // The worker's state: a staging buffer it keeps (a device buffer, say).
    /// let mut m = Methods::<Vec<u8>>::new();
    /// m.on_view(&UPLOAD, |staging, bytes: &[u8]| {
    ///     staging.clear();
    ///     staging.extend_from_slice(bytes);
    ///     Ok::<_, String>(bytes.len() as u64)
    /// });
    /// assert!(m.contains("upload"));
    /// ```
    pub fn on_view<A, R, E, F>(&mut self, method: &Method<A, R>, mut handler: F) -> &mut Self
    where
        A: ArgView,
        // Kept between the two steps.
        R: Serialize + 'static,
        E: fmt::Display,
        F: for<'a> FnMut(&mut S, A::View<'a>) -> Result<R, E> + 'static,
    {
        // The handler's result waits here for the second step.
        let mut slot: Option<R> = None;
        self.insert(
            method.name(),
            Box::new(move |state, step| match step {
                Step::Decode(args) => {
                    let view = decode_arg::<A, A::View<'_>>(args)?;
                    slot = Some(handler(state, view).map_err(handler_failed)?);
                    Ok(())
                }
                Step::Run(out) => {
                    let r = slot.take().ok_or_else(not_decoded)?;
                    encode_result(&r, out)
                }
            }),
        )
    }

    /// Registers `entry` under `name`; a second registration replaces the
    /// first and is reported when serving starts.
    fn insert(&mut self, name: &str, entry: Handler<S>) -> &mut Self {
        let name = name.to_string();
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
