//! Many clients, one writer: the ledger behind a thread with group commit.
//!
//! Durability costs one fsync per commit. With many clients each sending a
//! single transfer, committing each alone would cap throughput at the disk's
//! fsync rate. The writer thread instead takes every request waiting in its
//! queue (up to [`GROUP_MAX_REQUESTS`]), applies them all in one SQLite
//! transaction, commits once, and only then answers each client: every
//! answer still means "durably stored", and one fsync serves the group.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use crate::error::{LedgerError, Refusal};
use crate::ledger::Ledger;
use crate::model::{NewAccount, NewTransfer, Transfer};

/// Most requests committed together. Bounds the latency of one commit.
pub const GROUP_MAX_REQUESTS: usize = 4096;

type TransferOutcomes = Vec<Result<Transfer, Refusal>>;
type Job = Box<dyn FnOnce(&mut Ledger) + Send>;

enum Request {
    Transfers {
        now: i64,
        transfers: Vec<NewTransfer>,
        reply: Sender<Result<TransferOutcomes, String>>,
    },
    /// Runs alone on the writer thread (account creation, vouchers, queries).
    Run(Job),
}

/// A handle to the writer thread; clone it freely.
#[derive(Clone)]
pub struct LedgerClient {
    sender: Sender<Request>,
}

/// Owns the writer thread; dropping it (after all clients) stops the thread.
pub struct LedgerService {
    client: Option<LedgerClient>,
    thread: Option<JoinHandle<()>>,
}

impl LedgerService {
    pub fn start(ledger: Ledger) -> LedgerService {
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer(ledger, receiver))
            .expect("spawn ledger writer");
        LedgerService { client: Some(LedgerClient { sender }), thread: Some(thread) }
    }

    pub fn client(&self) -> LedgerClient {
        self.client.clone().expect("service running")
    }
}

impl Drop for LedgerService {
    fn drop(&mut self) {
        self.client.take();
        if let Some(thread) = self.thread.take() {
            // The thread ends when the last client is dropped.
            let _ = thread.join();
        }
    }
}

impl LedgerClient {
    /// Applies transfers; returns once they are durably committed.
    pub fn create_transfers(&self, now: i64, transfers: Vec<NewTransfer>) -> Result<TransferOutcomes, LedgerError> {
        let (reply, answer) = mpsc::channel();
        self.sender.send(Request::Transfers { now, transfers, reply }).map_err(|_| LedgerError::WriterGone)?;
        answer
            .recv()
            .map_err(|_| LedgerError::WriterGone)?
            .map_err(|problem| LedgerError::Corrupt { path: "ledger".into(), problem })
    }

    /// Runs `f` on the writer thread with the ledger, and returns its result.
    pub fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Ledger) -> T + Send + 'static) -> Result<T, LedgerError> {
        let (reply, answer) = mpsc::channel();
        let job: Job = Box::new(move |ledger| {
            let _ = reply.send(f(ledger));
        });
        self.sender.send(Request::Run(job)).map_err(|_| LedgerError::WriterGone)?;
        answer.recv().map_err(|_| LedgerError::WriterGone)
    }

    pub fn create_accounts(
        &self,
        now: i64,
        accounts: Vec<NewAccount>,
    ) -> Result<Vec<Result<crate::Account, Refusal>>, LedgerError> {
        self.with(move |ledger| ledger.create_accounts(now, &accounts))?
    }
}

fn writer(mut ledger: Ledger, receiver: Receiver<Request>) {
    let mut held: Option<Request> = None;
    loop {
        let first = match held.take() {
            Some(r) => r,
            None => match receiver.recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let mut group = Vec::new();
        match first {
            Request::Run(job) => {
                job(&mut ledger);
                continue;
            }
            Request::Transfers { now, transfers, reply } => group.push((now, transfers, reply)),
        }
        while group.len() < GROUP_MAX_REQUESTS {
            match receiver.try_recv() {
                Ok(Request::Transfers { now, transfers, reply }) => group.push((now, transfers, reply)),
                Ok(other) => {
                    // A job runs after this group is committed, in order.
                    held = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let now = group.iter().map(|(now, _, _)| *now).max().unwrap_or(0);
        let outcome = ledger.write(now, |batch| {
            group
                .iter()
                .map(|(now, transfers, _)| {
                    batch.set_now(*now);
                    batch.create_transfers(transfers)
                })
                .collect::<Result<Vec<_>, _>>()
        });
        match outcome {
            Ok(all) => {
                for ((_, _, reply), outcomes) in group.into_iter().zip(all) {
                    let _ = reply.send(Ok(outcomes));
                }
            }
            Err(e) => {
                let problem = e.to_string();
                for (_, _, reply) in group {
                    let _ = reply.send(Err(problem.clone()));
                }
            }
        }
    }
}
