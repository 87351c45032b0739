//! Who owns a piece of state kml left behind (pins, tuning state): a pid, and
//! whether that pid is still a running kml-agent.

/// Is `pid` a running kml-agent?
pub fn agent_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "kml-agent")
}

/// Is `pid` a running kml-agent other than this process (whose state must not be
/// taken over)?
pub fn other_agent_alive(pid: u32) -> bool {
    pid != std::process::id() && agent_alive(pid)
}
