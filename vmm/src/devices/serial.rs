//! COM1: a 16550A UART at 0x3F8 on IRQ 4, the vm-superio model wrapped with
//! the output path (console sink plus a line scanner that spots the guest's
//! markers) and an interrupt flag the run loop turns into an IRQ 4 edge.

use std::io::{self, Write};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Base port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u8 = 4;

/// vm-superio wants a trigger to call when it raises its interrupt; the
/// monitor instead reads the line level ([`SerialPort::irq_level`]) after
/// each access, so the trigger does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct LevelOnly;

impl Trigger for LevelOnly {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Something the guest printed that the monitor acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// The kernel started the first user process (`Run /init`).
    InitStarted,
    /// The guest's init printed the ready marker.
    Ready,
    /// The kernel panicked; the line is kept for the error message.
    Panic(String),
}

/// Marker the guest's init prints when it is ready.
pub const READY_MARKER: &str = "VMFT-READY";

/// Where guest console output goes, and the scanner for markers.
pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    line: Vec<u8>,
    events: Vec<ConsoleEvent>,
    panicking: Option<String>,
}

impl std::fmt::Debug for ConsoleOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOut")
            .field("line", &String::from_utf8_lossy(&self.line))
            .finish()
    }
}

impl ConsoleOut {
    /// Console output written to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        ConsoleOut {
            sink,
            line: Vec::new(),
            events: Vec::new(),
            panicking: None,
        }
    }

    fn scan_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        if line.contains(READY_MARKER) {
            self.events.push(ConsoleEvent::Ready);
        } else if line.contains("Run /init as init process") {
            self.events.push(ConsoleEvent::InitStarted);
        }
        if let Some(first) = &self.panicking {
            // The panic message is complete at its end marker.
            if line.contains("end Kernel panic") {
                self.events.push(ConsoleEvent::Panic(first.clone()));
                self.panicking = None;
            }
        } else if line.contains("Kernel panic - not syncing") {
            let msg = line.trim().to_string();
            self.panicking = Some(msg);
        }
        self.line.clear();
    }

    /// Send further output to `sink` (a backup that goes live).
    pub fn set_sink(&mut self, sink: Box<dyn Write + Send>) {
        let _ = self.sink.flush();
        self.sink = sink;
    }

    /// Take the events recognised since the last call.
    pub fn take_events(&mut self) -> Vec<ConsoleEvent> {
        std::mem::take(&mut self.events)
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.scan_line();
            } else if b != b'\r' && self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        // A console that went away (closed pipe) must not stop the guest.
        let _ = self.sink.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.sink.flush();
        Ok(())
    }
}

/// The COM1 UART.
#[derive(Debug)]
pub struct SerialPort {
    uart: Serial<LevelOnly, NoEvents, ConsoleOut>,
}

impl SerialPort {
    /// A UART in its reset state writing to `out`.
    pub fn new(out: ConsoleOut) -> Self {
        SerialPort {
            uart: Serial::new(LevelOnly, out),
        }
    }

    /// Whether this port belongs to COM1.
    pub fn handles(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + 8).contains(&port)
    }

    /// Port read.
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    /// Port write.
    pub fn write(&mut self, port: u16, value: u8) {
        // Output errors are absorbed by ConsoleOut; the trigger cannot fail.
        let _ = self.uart.write((port - COM1_BASE) as u8, value);
    }

    /// Room in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queue received bytes (console input); returns how many fit.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Level of the UART's INTR output: some interrupt is pending in IIR
    /// and enabled in IER, as on a 16550.
    ///
    /// vm-superio signals only when an IIR bit goes from clear to set, so
    /// when a driver disables and re-enables THRI while THRE is still
    /// pending (the Linux 8250 driver does, in start_tx) no new edge would
    /// reach an edge-triggered PIC and transmission would stall. The run
    /// loop drives IRQ 4 with this level instead.
    pub fn irq_level(&self) -> bool {
        let s = self.uart.state();
        let pending = s.interrupt_identification;
        if pending & 0x01 != 0 {
            return false; // IIR: no interrupt pending
        }
        let thre = pending & 0x02 != 0 && s.interrupt_enable & 0x02 != 0;
        let rda = pending & 0x04 != 0 && s.interrupt_enable & 0x01 != 0;
        thre || rda
    }

    /// The console output path.
    pub fn console(&mut self) -> &mut ConsoleOut {
        self.uart.writer_mut()
    }

    /// Serialise the device state.
    pub fn encode(&self, e: &mut Encoder) {
        let s = self.uart.state();
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            e.u8(b);
        }
        e.bytes(&s.in_buffer);
    }

    /// Restore from [`SerialPort::encode`] output, writing to `out`.
    pub fn decode(d: &mut Decoder, out: ConsoleOut) -> Result<Self, SnapshotError> {
        let state = SerialState {
            baud_divisor_low: d.u8()?,
            baud_divisor_high: d.u8()?,
            interrupt_enable: d.u8()?,
            interrupt_identification: d.u8()?,
            line_control: d.u8()?,
            line_status: d.u8()?,
            modem_control: d.u8()?,
            modem_status: d.u8()?,
            scratch: d.u8()?,
            in_buffer: d.bytes()?.to_vec(),
        };
        let uart = Serial::from_state(&state, LevelOnly, NoEvents, out)
            .map_err(|e| SnapshotError::Invalid(format!("serial state: {e}")))?;
        Ok(SerialPort { uart })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const THR: u16 = COM1_BASE;
    const IER: u16 = COM1_BASE + 1;
    const IIR: u16 = COM1_BASE + 2;
    const LCR: u16 = COM1_BASE + 3;
    const LSR: u16 = COM1_BASE + 5;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn port() -> (SerialPort, Capture) {
        let cap = Capture::default();
        (SerialPort::new(ConsoleOut::new(Box::new(cap.clone()))), cap)
    }

    #[test]
    fn thr_write_reaches_console_and_lsr_reports_empty() {
        let (mut p, cap) = port();
        for b in b"hi\n" {
            p.write(THR, *b);
        }
        assert_eq!(&*cap.0.lock().unwrap(), b"hi\n");
        let lsr = p.read(LSR);
        assert_eq!(lsr & 0x60, 0x60, "THR empty and transmitter idle");
    }

    #[test]
    fn thr_empty_interrupt_when_enabled() {
        let (mut p, _) = port();
        p.write(THR, b'a');
        assert!(!p.irq_level(), "no interrupt while IER is clear");
        p.write(IER, 0x02); // enable THRE interrupt
        assert!(p.irq_level(), "enabling THRE with an empty THR interrupts");
        assert_eq!(p.read(IIR) & 0x0f, 0x02, "IIR: THR empty");
        p.write(THR, b'b');
        assert!(p.irq_level(), "each transmitted byte re-raises THRE");
    }

    #[test]
    fn received_data_sets_lsr_and_interrupt() {
        let (mut p, _) = port();
        p.write(IER, 0x01);
        assert!(!p.irq_level(), "nothing received yet");
        assert_eq!(p.receive(b"xy"), 2);
        assert!(p.irq_level());
        assert_eq!(p.read(LSR) & 1, 1, "data ready");
        assert_eq!(p.read(IIR) & 0x0f, 0x04, "IIR: received data");
        assert_eq!(p.read(THR), b'x');
        assert_eq!(p.read(THR), b'y');
        assert_eq!(p.read(LSR) & 1, 0, "drained");
    }

    #[test]
    fn dlab_exposes_divisor_latch() {
        let (mut p, cap) = port();
        p.write(LCR, 0x80);
        p.write(THR, 0x01);
        p.write(IER, 0x00);
        assert_eq!(p.read(THR), 0x01);
        p.write(LCR, 0x03);
        assert!(
            cap.0.lock().unwrap().is_empty(),
            "divisor write is not output"
        );
    }

    #[test]
    fn re_enabling_thri_with_thre_pending_raises_the_line_again() {
        let (mut p, _) = port();
        p.write(IER, 0x02);
        assert!(p.irq_level(), "THRE pending and enabled");
        p.write(IER, 0x00);
        assert!(!p.irq_level(), "disabled: the line drops");
        p.write(IER, 0x02);
        assert!(
            p.irq_level(),
            "re-enabled: the line rises again (a new edge)"
        );
        assert_eq!(p.read(IIR) & 0x0f, 0x02);
        assert!(!p.irq_level(), "reading IIR acknowledges THRE");
        p.write(THR, b'x');
        assert!(p.irq_level(), "transmitting re-raises THRE");
    }

    #[test]
    fn scanner_recognises_markers_and_panic() {
        let (mut p, _) = port();
        let text = "[ 1.0] Run /init as init process\r\nVMFT-READY workload=x\n\
                    Kernel panic - not syncing: Attempted to kill init!\n---[ end Kernel panic - not syncing: x ]---\n";
        for b in text.bytes() {
            p.write(THR, b);
        }
        let ev = p.console().take_events();
        assert_eq!(ev[0], ConsoleEvent::InitStarted);
        assert_eq!(ev[1], ConsoleEvent::Ready);
        assert!(matches!(&ev[2], ConsoleEvent::Panic(m) if m.contains("Attempted to kill init")));
    }

    #[test]
    fn state_round_trips() {
        let (mut p, _) = port();
        p.write(LCR, 0x03);
        p.write(IER, 0x03);
        p.receive(b"q");
        let mut e = Encoder::new();
        p.encode(&mut e);
        let bytes = e.into_bytes();
        let mut back = SerialPort::decode(
            &mut Decoder::new(&bytes),
            ConsoleOut::new(Box::new(io::sink())),
        )
        .unwrap();
        assert_eq!(back.read(LCR), 0x03);
        assert_eq!(back.read(IER), 0x03);
        assert_eq!(back.read(THR), b'q');
    }
}
