//! A tiny HTTP/1.1 backend for `scripts/demo` and `scripts/demo-rollout`: healthy (200) while a control file is
//! absent, 503 while it exists.
//!
//! Usage: `demo_backend ADDR CONTROL_FILE [NAME]`, e.g. `demo_backend 127.0.0.1:0 /tmp/x/down web@1`. The first stdout
//! line is the address it actually bound. Every request, whatever its method or path, gets `200 OK` with body `ok\n`
//! while CONTROL_FILE does not exist and `503 Service Unavailable` with body `down\n` while it does; with NAME, every
//! response also says `X-Served-By: NAME`, so a client behind a load balancer sees which instance answered. Each
//! connection is closed after one response.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Most bytes of request head read before giving up on a client.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (addr, control, name) = match args.as_slice() {
        [_, addr, control] => (addr, control, None),
        [_, addr, control, name] if !name.is_empty() && !name.chars().any(char::is_control) => {
            (addr, control, Some(name.clone()))
        }
        _ => {
            eprintln!(
                "usage: demo_backend ADDR CONTROL_FILE [NAME]   (e.g. demo_backend 127.0.0.1:0 /tmp/x/down web@1)"
            );
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(addr.as_str()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo_backend: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bound = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo_backend: cannot read the bound address: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = io::stdout().lock();
    if writeln!(out, "{bound}").and_then(|()| out.flush()).is_err() {
        eprintln!("demo_backend: cannot write the bound address to stdout");
        return ExitCode::FAILURE;
    }
    drop(out);

    let control = Arc::new(PathBuf::from(control));
    let served_by = Arc::new(name.map(|n| format!("X-Served-By: {n}\r\n")).unwrap_or_default());
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let (control, served_by) = (Arc::clone(&control), Arc::clone(&served_by));
                thread::spawn(move || {
                    if let Err(e) = serve(stream, &control, &served_by) {
                        eprintln!("demo_backend: connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("demo_backend: accept: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    ExitCode::SUCCESS
}

/// Reads one request head, answers by the control file (with the `served_by` header line, if any), and closes.
fn serve(mut stream: TcpStream, control: &Path, served_by: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    if !read_head(&mut stream)? {
        return Ok(());
    }
    let (status, body) = if control.exists() {
        ("503 Service Unavailable", "down\n")
    } else {
        ("200 OK", "ok\n")
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{served_by}Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    // Tell the client we are done; errors here only mean it already left.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Reads until the blank line that ends the request head. Returns false when the client closed before sending a
/// whole head; errors when the head is too long or the client is too slow.
fn read_head(stream: &mut TcpStream) -> io::Result<bool> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(true);
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head over 16 KiB"));
        }
    }
}
