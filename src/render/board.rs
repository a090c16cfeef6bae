//! What `render` shows on `--status-addr`: per template its name, DEST,
//! the revision rendered, the last rendering and error, the counters, and
//! the last time each step of "change to reload" took, so a checker can
//! bound that time from measured figures.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::status::{escape_label, Shows};

/// One template's figures.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    /// The revision of the keys last rendered.
    pub revision: Option<i64>,
    /// When the last rendering was installed or found unchanged.
    pub last_render: Option<SystemTime>,
    /// The last error (read, render, check, install or reload), cleared by
    /// the next success of that step.
    pub last_error: Option<String>,
    /// Renderings done.
    pub renders: u64,
    /// Renderings that failed (render, check or install).
    pub render_errors: u64,
    /// Reload commands that succeeded.
    pub reloads: u64,
    /// Reload commands that failed.
    pub reload_failures: u64,
    /// The last consistent read's round trip.
    pub read: Option<Duration>,
    /// The endpoint of the last consistent read, which the watch follows.
    pub endpoint: Option<String>,
    /// The last rendering's time.
    pub render: Option<Duration>,
    /// The last check command's time.
    pub check: Option<Duration>,
    /// The last reload command's time.
    pub reload: Option<Duration>,
}

/// A template's figures, shared between its loop and the status server.
#[derive(Debug)]
pub struct Card {
    /// The template's name.
    pub name: String,
    /// Its DEST.
    pub dest: String,
    /// `wait`'s MAX, zero without `wait`.
    pub wait_max: Duration,
    figures: Mutex<Figures>,
}

impl Card {
    /// A card with nothing rendered yet.
    pub fn new(name: &str, dest: &str, wait_max: Duration) -> Card {
        Card {
            name: name.to_string(),
            dest: dest.to_string(),
            wait_max,
            figures: Mutex::new(Figures::default()),
        }
    }

    /// Changes the figures.
    pub fn update(&self, f: impl FnOnce(&mut Figures)) {
        f(&mut self.figures.lock().expect("card lock"));
    }

    /// A copy of the figures.
    pub fn figures(&self) -> Figures {
        self.figures.lock().expect("card lock").clone()
    }

    fn json(&self) -> serde_json::Value {
        let f = self.figures();
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        serde_json::json!({
            "name": self.name,
            "dest": self.dest,
            "revision": f.revision,
            "endpoint": f.endpoint,
            "last_render": f.last_render.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            "last_error": f.last_error,
            "renders": f.renders,
            "render_errors": f.render_errors,
            "reloads": f.reloads,
            "reload_failures": f.reload_failures,
            "last_read_s": secs(f.read),
            "last_render_s": secs(f.render),
            "last_check_s": secs(f.check),
            "last_reload_s": secs(f.reload),
            "wait_max_s": self.wait_max.as_secs_f64(),
        })
    }
}

/// Every running template's card; a reload changes the list.
#[derive(Debug, Default)]
pub struct Board(Mutex<Vec<Arc<Card>>>);

impl Board {
    /// Adds a starting template's card.
    pub fn add(&self, card: Arc<Card>) {
        self.0.lock().expect("board lock").push(card);
    }

    /// Takes a stopped template's card off.
    pub fn remove(&self, card: &Arc<Card>) {
        self.0.lock().expect("board lock").retain(|c| !Arc::ptr_eq(c, card));
    }

    fn cards(&self) -> Vec<Arc<Card>> {
        self.0.lock().expect("board lock").clone()
    }
}

/// A counter family: its name, its help, and how to read it off.
type Family = (&'static str, &'static str, fn(&Figures) -> u64);

impl Shows for Board {
    fn status(&self) -> String {
        let templates: Vec<serde_json::Value> = self.cards().iter().map(|c| c.json()).collect();
        serde_json::json!({ "templates": templates }).to_string()
    }

    fn metrics(&self) -> String {
        let cards = self.cards();
        let mut out = String::new();
        let families: [Family; 4] = [
            (
                "sidekick_render_total",
                "Renderings installed or found unchanged.",
                |f| f.renders,
            ),
            (
                "sidekick_render_errors_total",
                "Renderings that failed: template, check or install.",
                |f| f.render_errors,
            ),
            ("sidekick_reloads_total", "Reload commands that succeeded.", |f| {
                f.reloads
            }),
            ("sidekick_reload_failures_total", "Reload commands that failed.", |f| {
                f.reload_failures
            }),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for c in &cards {
                let _ = writeln!(
                    out,
                    "{name}{{template=\"{}\"}} {}",
                    escape_label(&c.name),
                    get(&c.figures())
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP sidekick_render_revision The etcd revision of the keys last rendered.\n# TYPE sidekick_render_revision gauge"
        );
        for c in &cards {
            if let Some(r) = c.figures().revision {
                let _ = writeln!(
                    out,
                    "sidekick_render_revision{{template=\"{}\"}} {r}",
                    escape_label(&c.name)
                );
            }
        }
        out
    }

    fn healthy(&self) -> bool {
        true
    }
}
