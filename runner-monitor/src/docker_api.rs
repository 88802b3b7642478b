//! The agent's few requests to a Docker daemon's API socket: one `GET` at a time over
//! HTTP/1.0 (the daemon closes the connection after its answer), an answer other than 200 an
//! error, the body read up to a bound and parsed as JSON. Errors say where an answer broke,
//! never what it held: a container's description carries its environment, and so the job's
//! secrets.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

/// Connects to `socket` and sends `GET <path>`; the answer's status line and headers are read.
pub fn request(
    socket: &Path,
    path: &str,
    timeout: Option<Duration>,
) -> std::io::Result<BufReader<UnixStream>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    // One write: `write!` on the bare stream would send each piece of the format on its own.
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    expect_ok(&mut reader)?;
    Ok(reader)
}

/// `GET <path>`, its body (at most `cap` bytes) parsed as JSON.
pub fn get(
    socket: &Path,
    path: &str,
    timeout: Duration,
    cap: u64,
) -> std::io::Result<serde_json::Value> {
    let reader = request(socket, path, Some(timeout))?;
    let mut body = Vec::new();
    reader.take(cap).read_to_end(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the daemon's answer to {path} broke at line {} column {}",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Reads the status line and headers; an answer other than 200 is an error.
fn expect_ok(reader: &mut impl BufRead) -> std::io::Result<()> {
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.contains(" 200 ") {
        return Err(std::io::Error::other(format!(
            "the daemon answered {:?}",
            status.trim_end()
        )));
    }
    let mut header = String::new();
    loop {
        header.clear();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            return Ok(());
        }
    }
}

/// A fake daemon for unit tests.
#[cfg(test)]
pub(crate) mod fake {
    use std::{
        io::{Read as _, Write as _},
        os::unix::net::UnixListener,
    };

    /// A socket that answers one request with `answer`, and hands the request it got to the
    /// returned receiver; the socket is removed with the returned guard.
    pub fn answering(
        answer: &'static str,
    ) -> (
        Removed,
        std::path::PathBuf,
        std::sync::mpsc::Receiver<String>,
    ) {
        answering_each(&[answer])
    }

    /// The same for one request per answer, in order, each on its own connection.
    pub fn answering_each(
        answers: &[&'static str],
    ) -> (
        Removed,
        std::path::PathBuf,
        std::sync::mpsc::Receiver<String>,
    ) {
        let answers = answers.to_vec();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("rm-docker-api-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for answer in answers {
                let (mut stream, _) = listener.accept().unwrap();
                // The whole request, up to the blank line after its headers, as a daemon reads it:
                // answering after the first read and closing made the client's rest fail (EPIPE).
                let mut request = Vec::new();
                let mut chunk = [0u8; 512];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                stream.write_all(answer.as_bytes()).unwrap();
            }
        });
        (Removed(path.clone()), path, rx)
    }

    pub struct Removed(std::path::PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::answering, *};

    #[test]
    fn a_200_answer_is_parsed_and_anything_else_is_an_error_without_its_body() {
        let (_dir, path, _) =
            answering("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Id\":\"ab\"}");
        let answer = get(
            &path,
            "/containers/ab/json",
            Duration::from_secs(2),
            1 << 10,
        )
        .unwrap();
        assert_eq!(answer["Id"], "ab");

        let (_dir, path, _) = answering("HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"CANARY\"}");
        let error = get(&path, "/x", Duration::from_secs(2), 1 << 10)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("404") && !error.contains("CANARY"),
            "{error}"
        );

        let (_dir, path, _) = answering("HTTP/1.0 200 OK\r\n\r\n{\"Env\":[\"TOKEN=CANARY\"");
        let error = get(&path, "/x", Duration::from_secs(2), 1 << 10)
            .unwrap_err()
            .to_string();
        assert!(!error.contains("CANARY"), "{error}");
    }
}
