//! The part of the i8042 keyboard controller a PC guest uses to reset the
//! machine: command 0xFE on port 0x64 pulses the CPU reset line.
//! vm-superio's `I8042Device` does the same but signals through an eventfd
//! the run loop would have to poll; a flag read at the exit is simpler and
//! keeps the reset at a deterministic point.

/// Data port.
pub const DATA: u16 = 0x60;
/// Status (read) / command (write) port.
pub const COMMAND: u16 = 0x64;
/// Command that pulses the reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// Reset-only i8042.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct I8042 {
    reset_requested: bool,
}

impl I8042 {
    /// Whether this port belongs to the controller.
    pub fn handles(port: u16) -> bool {
        port == DATA || port == COMMAND
    }

    /// Port read: output buffer empty, input buffer empty, no data.
    pub fn read(&mut self, _port: u16) -> u8 {
        0
    }

    /// Port write.
    pub fn write(&mut self, port: u16, value: u8) {
        if port == COMMAND && value == CMD_RESET_CPU {
            self.reset_requested = true;
        }
    }

    /// Whether the guest asked for a CPU reset.
    pub fn reset_requested(&self) -> bool {
        self.reset_requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_is_latched() {
        let mut k = I8042::default();
        assert_eq!(k.read(COMMAND) & 0x02, 0, "input buffer empty");
        k.write(DATA, CMD_RESET_CPU);
        assert!(!k.reset_requested(), "0xFE on the data port is not a reset");
        k.write(COMMAND, 0xd1);
        assert!(!k.reset_requested());
        k.write(COMMAND, CMD_RESET_CPU);
        assert!(k.reset_requested());
    }
}
