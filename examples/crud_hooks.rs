//! CRUD hooks wired into an HTTP handler: a small users API whose create, update and delete
//! handlers publish `public.users.*` events through `CrudHooks`, never waiting on the broker and
//! never failing a request because of it. An audit subscriber prints what it receives.
//!
//! By default the example starts the server on a free loopback port, sends it a few requests
//! itself and exits; `--serve ADDR` keeps serving instead:
//!
//! ```text
//! cargo run --example crud_hooks
//! cargo run --example crud_hooks -- --serve 127.0.0.1:8080
//! curl -X POST -d '{"name":"Ada"}' http://127.0.0.1:8080/users
//! curl -X PUT -d '{"name":"Ada L."}' http://127.0.0.1:8080/users/1
//! curl -X DELETE http://127.0.0.1:8080/users/1
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbroker::hooks::{CrudHookConfig, CrudHooks, UserContext};
use eventbroker::{Broker, Event};
use serde_json::{Value, json};

/// The application: its table, and the hooks its handlers call after each write.
struct App {
    users: Mutex<BTreeMap<u64, Value>>,
    next_id: Mutex<u64>,
    hooks: CrudHooks,
}

impl App {
    /// Handles one request: `(status, body)`.
    fn handle(&self, method: &tiny_http::Method, url: &str, body: &str, user: &UserContext) -> (u16, Value) {
        let id = url.strip_prefix("/users/").and_then(|id| id.parse::<u64>().ok());
        let mut users = self.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (method, url, id) {
            (tiny_http::Method::Post, "/users", _) => {
                // An object only: a list or a string has no "id" to set.
                let Ok(mut record @ Value::Object(_)) = serde_json::from_str::<Value>(body) else {
                    return (400, json!({"error": "expected a JSON object"}));
                };
                let mut next_id = self.next_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                *next_id += 1;
                record["id"] = json!(*next_id);
                users.insert(*next_id, record.clone());
                // After the write succeeded; the outcome does not change the response.
                self.hooks.after_create(user, "public", "users", &record);
                (201, record)
            }
            (tiny_http::Method::Put, _, Some(id)) if users.contains_key(&id) => {
                let Ok(data) = serde_json::from_str::<Value>(body) else {
                    return (400, json!({"error": "expected a JSON object"}));
                };
                users.insert(id, data.clone());
                self.hooks.after_update(user, "public", "users", &id, &data);
                (200, data)
            }
            (tiny_http::Method::Delete, _, Some(id)) if users.remove(&id).is_some() => {
                self.hooks.after_delete(user, "public", "users", &id);
                (204, Value::Null)
            }
            (tiny_http::Method::Get, _, Some(id)) => match users.get(&id) {
                Some(record) => {
                    // Off by default (`CrudHookConfig::read`): reads are the bulk of the traffic.
                    self.hooks.after_read(user, "public", "users", record);
                    (200, record.clone())
                }
                None => (404, json!({"error": "no such user"})),
            },
            _ => (404, json!({"error": "no such route"})),
        }
    }
}

/// Serves requests until the server is unblocked. The user would come from authentication; here
/// from an `X-User-Id` header.
fn serve(server: &tiny_http::Server, app: &App) {
    for mut request in server.incoming_requests() {
        let mut body = String::new();
        let _ = request.as_reader().read_to_string(&mut body);
        let user_id = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("X-User-Id"))
            .and_then(|h| h.value.as_str().parse().ok())
            .unwrap_or(0);
        let user = UserContext::new(user_id).with_session_id("demo-session").with_user_name("demo");
        let (status, reply) = app.handle(request.method(), request.url(), &body, &user);
        let response = tiny_http::Response::from_string(reply.to_string()).with_status_code(status);
        if let Err(error) = request.respond(response) {
            eprintln!("responding failed: {error}");
        }
    }
}

/// One request from the demo client; returns the status line.
fn request(address: &str, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: demo\r\nX-User-Id: 42\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.lines().next().unwrap_or_default().to_owned())
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let broker = Broker::builder().workers(2).build()?;
    broker.subscribe_infallible("public.users.*", |event: &Event| {
        println!(
            "audit: {} by user {} ({}): {}",
            event.event_type,
            event.user_id,
            event.metadata.get("user_name").and_then(Value::as_str).unwrap_or("?"),
            event.payload_json().unwrap_or("null"),
        );
    })?;
    let app = Arc::new(App {
        users: Mutex::new(BTreeMap::new()),
        next_id: Mutex::new(0),
        hooks: CrudHooks::new(&broker, CrudHookConfig::default()),
    });

    let args: Vec<String> = std::env::args().collect();
    if let Some(address) = args.iter().position(|a| a == "--serve").and_then(|i| args.get(i + 1)) {
        let server = tiny_http::Server::http(address)?;
        println!("serving http://{address}/users");
        serve(&server, &app);
        return Ok(());
    }

    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0")?);
    let address = server.server_addr().to_ip().ok_or("not an IP listener")?.to_string();
    let serving = {
        let (server, app) = (Arc::clone(&server), Arc::clone(&app));
        std::thread::spawn(move || serve(&server, &app))
    };
    for (method, path, body) in [
        ("POST", "/users", r#"{"name":"Ada"}"#),
        ("POST", "/users", r#"["not", "a", "user"]"#),
        ("PUT", "/users/1", r#"{"name":"Ada L."}"#),
        ("GET", "/users/1", ""),
        ("DELETE", "/users/1", ""),
    ] {
        println!("{method} {path}: {}", request(&address, method, path, body)?);
    }
    server.unblock();
    serving.join().map_err(|_| "the server thread panicked")?;

    broker.drain(Duration::from_secs(5))?;
    println!("hooks: {:?}", app.hooks.stats());
    let report = broker.shutdown(Duration::from_secs(5));
    println!("shut down cleanly: {}", report.is_clean());
    Ok(())
}
