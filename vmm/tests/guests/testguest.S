# vmft test guest: a few pages of 64-bit code for record/replay tests.
#
# Loaded as an ELF "kernel" at 16 MiB; vmft enters it in 64-bit mode at
# CPL0. It installs its own GDT, TSS, IDT and user-accessible identity page
# tables, programs the 8259 PIC and the 8254 PIT (IRQ0 at 100 Hz), and runs
# the workload selected at assembly time with --defsym MODE=n, mostly at
# CPL3 (native speed on hosts whose KVM emulates kernel code) with IOPL=3
# (IOPL=3 is not honoured for guest user mode on nested KVM hosts whose
# guest runs in host user mode, so `in`/`out` at CPL3 raise #GP; the #GP
# handler performs the access at CPL0, as an OS would). It prints its results on COM1 and ends by
# resetting the machine through the i8042 (vmft: "guest reset").
#
#   MODE 1  compute loop (LCG) with timer interrupts: the epoch path
#   MODE 2  `inc qword [x]; jmp back` until the timer handler ends it
#   MODE 3  writes many pages, several rounds
#   MODE 4  HLT idle at CPL0, woken by the timer
#   MODE 5  reads the PIT counter and the CMOS clock
#   MODE 6  console input: echoes bytes until it has seen 3 newlines
#   MODE 7  deliberately nondeterministic: branches on RDTSC into different exits
#   MODE 8  CPL0 with IF=0, an exit every ~6 ms while a timer tick waits
#           (the primary must not kick the vCPU out continuously)
#   MODE 9  CPL0: writes an MSR outside the classic save list (0x140,
#           MISC_FEATURES_ENABLES) inside an exit-free stretch that an epoch
#           replaces, reads it back
#   MODE 10 prints READY, then spins reading the PIT forever (a hung guest
#           the progress watchdog must name)
#   MODE 11 console input: echoes bytes until it gets a '.', then prints
#           the checksum of every byte it got (h = h * 131 + byte)
#   MODE 12 MODE 7 for seconds (100000 rounds): a pair whose backup
#           diverges again and again (divergence repair)

        .intel_syntax noprefix
        .code64
        .section .text
        .globl _start

        .equ COM1, 0x3f8
        .equ KCODE, 0x08
        .equ KDATA, 0x10
        .equ UDATA, 0x1b
        .equ UCODE, 0x23
        .equ TSSSEL, 0x28

_start:
        cli
        lea rsp, [kstack_top]
        lgdt [gdt_ptr]
        # Reload CS with a far return, then the data segments.
        push KCODE
        lea rax, [1f]
        push rax
        retfq
1:      mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov ss, ax
        xor eax, eax
        mov fs, ax
        mov gs, ax

        # TSS descriptor (base = tss), then load TR.
        lea rax, [tss]
        mov word ptr [gdt_tss + 0], 103
        mov word ptr [gdt_tss + 2], ax
        shr rax, 16
        mov byte ptr [gdt_tss + 4], al
        mov byte ptr [gdt_tss + 5], 0x89
        mov byte ptr [gdt_tss + 6], 0
        mov byte ptr [gdt_tss + 7], ah
        shr rax, 16
        mov dword ptr [gdt_tss + 8], eax
        mov dword ptr [gdt_tss + 12], 0
        lea rax, [kstack_top]
        mov [tss + 4], rax              # RSP0
        mov ax, TSSSEL
        ltr ax

        # IDT: every vector to `fault`, 0x20 to `timer`.
        lea rdi, [idt]
        xor ecx, ecx
2:      lea rax, [fault]
        cmp ecx, 13
        jne 31f
        lea rax, [gp]
31:     cmp ecx, 0x20
        jne 3f
        lea rax, [timer]
3:      mov word ptr [rdi], ax
        mov word ptr [rdi + 2], KCODE
        mov word ptr [rdi + 4], 0x8e00  # present, DPL0, interrupt gate
        shr rax, 16
        mov word ptr [rdi + 6], ax
        shr rax, 16
        mov dword ptr [rdi + 8], eax
        mov dword ptr [rdi + 12], 0
        add rdi, 16
        inc ecx
        cmp ecx, 48
        jb 2b
        lidt [idt_ptr]

        # Page tables: identity map of 1 GiB in 2 MiB pages, user accessible.
        lea rax, [pdpt]
        or rax, 7
        mov [pml4], rax
        lea rax, [pd]
        or rax, 7
        mov [pdpt], rax
        lea rdi, [pd]
        xor ecx, ecx
4:      mov rax, rcx
        shl rax, 21
        or rax, 0x87
        mov [rdi + rcx * 8], rax
        inc ecx
        cmp ecx, 512
        jb 4b
        lea rax, [pml4]
        mov cr3, rax

        # 8259: master at 0x20, slave at 0x28, only IRQ0 unmasked.
        mov al, 0x11
        out 0x20, al
        out 0xa0, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x28
        out 0xa1, al
        mov al, 4
        out 0x21, al
        mov al, 2
        out 0xa1, al
        mov al, 1
        out 0x21, al
        out 0xa1, al
        mov al, 0xfe
        out 0x21, al
        mov al, 0xff
        out 0xa1, al

        # 8254 channel 0: mode 2, 11932 (100 Hz).
        mov al, 0x34
        out 0x43, al
        mov al, 0x9c
        out 0x40, al
        mov al, 0x2e
        out 0x40, al

.if MODE == 4
        jmp kernel_idle
.endif
.if MODE == 8
        jmp kernel_busy_if0
.endif
.if MODE == 9
        jmp kernel_msr
.endif
.if MODE == 10
        lea rsi, [msg_ready]
        call kputs
46:     in al, 0x40
        jmp 46b
.endif
        # Drop to CPL3 with IF=1 and IOPL=3.
        push UDATA
        lea rax, [ustack_top]
        push rax
        push 0x3202
        push UCODE
        lea rax, [user]
        push rax
        iretq

# ---------------------------------------------------------------- CPL0 code
timer:
        push rax
        mov al, 0x20
        out 0x20, al                    # EOI
        inc qword ptr [ticks]
.if MODE == 2
        # After 30 ticks, send the user loop to its end (patch the return RIP).
        cmp qword ptr [ticks], 30
        jb 5f
        lea rax, [user_done]
        mov [rsp + 8], rax
5:
.endif
        pop rax
        iretq

# #GP from user mode: perform `in al, dx` (ec), `out dx, al` (ee),
# `in al, imm8` (e4) or `out imm8, al` (e6) for the user, then return past it.
gp:
        push rax
        push rdx
        push rsi
        # [rsp]: rsi, +8: rdx, +16: rax, +24: error code, +32: RIP
        mov rsi, [rsp + 32]
        mov al, [rsi]
        cmp al, 0xee
        je 32f
        cmp al, 0xec
        je 33f
        cmp al, 0xe6
        je 34f
        cmp al, 0xe4
        je 35f
        pop rsi
        pop rdx
        pop rax
        jmp fault
32:     mov rdx, [rsp + 8]
        mov rax, [rsp + 16]
        out dx, al
        add qword ptr [rsp + 32], 1
        jmp 36f
33:     mov rdx, [rsp + 8]
        in al, dx
        mov [rsp + 16], al
        add qword ptr [rsp + 32], 1
        jmp 36f
34:     movzx edx, byte ptr [rsi + 1]
        mov rax, [rsp + 16]
        out dx, al
        add qword ptr [rsp + 32], 2
        jmp 36f
35:     movzx edx, byte ptr [rsi + 1]
        in al, dx
        mov [rsp + 16], al
        add qword ptr [rsp + 32], 2
36:     pop rsi
        pop rdx
        pop rax
        add rsp, 8                      # error code
        iretq

fault:
        # Print the two words on top of the stack (error code or RIP), then
        # stop with interrupts off (vmft reports a halted guest).
        lea rsi, [msg_fault]
        call kputs
        mov rdi, [rsp]
        call kprint_hex
        mov rdi, [rsp + 8]
        call kprint_hex
        cli
30:     hlt
        jmp 30b

kputs:
        mov dx, COM1
6:      lodsb
        test al, al
        jz 7f
        out dx, al
        jmp 6b
7:      ret

.if MODE == 8
# 100 rounds of an exit-free stretch (emulated here: about 6 ms) ending in
# an `out` to port 0x80, all with interrupts disabled, so timer ticks fall
# due and wait; then enable interrupts and count the ticks delivered.
kernel_busy_if0:
        mov r8, 100
40:     mov ecx, 5000
41:     dec ecx
        jnz 41b
        out 0x80, al
        dec r8
        jnz 40b
        sti
42:     hlt
        cmp qword ptr [ticks], 5
        jb 42b
        cli
        lea rsi, [msg_ticks]
        call kputs
        mov rdi, [ticks]
        call kprint_hex
        mov dx, 0x64
        mov al, 0xfe
        out dx, al
43:     hlt
        jmp 43b
.endif

.if MODE == 9
# With the timer running, write MSR 0x140 (bit 0, CPUID faulting: unused
# here) and then run about 60 ms
# without an exit (CPL0 is emulated here): the primary cuts an epoch in the
# stretch, so the backup never executes the wrmsr and has the value only if
# the epoch carries the MSR. Then read it back and print it.
kernel_msr:
        sti
        mov ecx, 0x140
        mov eax, 1
        xor edx, edx
        wrmsr
        mov ecx, 30000
44:     dec ecx
        jnz 44b
        cli
        mov ecx, 0x140
        rdmsr
        shl rdx, 32
        or rax, rdx
        mov rdi, rax
        lea rsi, [msg_result]
        call kputs
        call kprint_hex
        mov dx, 0x64
        mov al, 0xfe
        out dx, al
45:     hlt
        jmp 45b
.endif

.if MODE == 4
kernel_idle:
        sti
8:      hlt
        cmp qword ptr [ticks], 50
        jb 8b
        cli
        lea rsi, [msg_ticks]
        call kputs
        mov rdi, [ticks]
        call kprint_hex
        mov dx, 0x64
        mov al, 0xfe
        out dx, al
9:      hlt
        jmp 9b
.endif

kprint_hex:
        mov rcx, 16
10:     rol rdi, 4
        mov rax, rdi
        and eax, 15
        lea rdx, [hexdigits]
        mov al, [rdx + rax]
        mov dx, COM1
        out dx, al
        dec rcx
        jnz 10b
        mov al, 10
        out dx, al
        ret

# ---------------------------------------------------------------- CPL3 code
user:
.if MODE == 1
        mov rcx, 400000000
        mov r8, 1
11:     imul r8, r8, 0x5851f42d
        add r8, 12345
        dec rcx
        jnz 11b
        mov rdi, r8
        lea rsi, [msg_result]
        call print_labelled
        jmp user_done
.endif
.if MODE == 2
12:     inc qword ptr [counter]
        jmp 12b
.endif
.if MODE == 3
        xor r9, r9                      # round
13:     xor r10, r10                    # page
14:     mov rax, r10
        shl rax, 12
        lea rdx, [scratch]
        add rdx, rax
        mov rax, r9
        xor rax, r10
        mov [rdx + r9 * 8], rax
        inc r10
        cmp r10, 4096
        jb 14b
        inc r9
        cmp r9, 8
        jb 13b
        # Checksum every word written.
        xor r8, r8
        xor r10, r10
15:     mov rax, r10
        shl rax, 12
        lea rdx, [scratch]
        add rdx, rax
        xor r9, r9
16:     mov rax, [rdx + r9 * 8]
        imul r8, r8, 31
        add r8, rax
        inc r9
        cmp r9, 8
        jb 16b
        inc r10
        cmp r10, 4096
        jb 15b
        mov rdi, r8
        lea rsi, [msg_result]
        call print_labelled
        jmp user_done
.endif
.if MODE == 5
        xor r8, r8
        mov r9, 2000
17:     mov al, 0                       # latch channel 0
        out 0x43, al
        in al, 0x40
        movzx eax, al
        add r8, rax
        in al, 0x40
        movzx eax, al
        shl rax, 8
        add r8, rax
        mov al, 0                       # CMOS seconds
        out 0x70, al
        in al, 0x71
        movzx eax, al
        add r8, rax
        mov rcx, 100000
18:     dec rcx
        jnz 18b
        dec r9
        jnz 17b
        mov rdi, r8
        lea rsi, [msg_result]
        call print_labelled
        jmp user_done
.endif
.if MODE == 6
        xor r8, r8                      # checksum
        xor r9, r9                      # newlines
        lea rsi, [msg_ready]
        call puts
19:     mov dx, COM1 + 5
        in al, dx                       # LSR
        test al, 1
        jz 19b
        mov dx, COM1
        in al, dx
        out dx, al                      # echo
        movzx eax, al
        imul r8, r8, 131
        add r8, rax
        cmp al, 10
        jne 19b
        inc r9
        cmp r9, 3
        jb 19b
        mov rdi, r8
        lea rsi, [msg_result]
        call print_labelled
        jmp user_done
.endif
.if MODE == 11
        xor r8, r8                      # checksum
        lea rsi, [msg_ready]
        call puts
47:     mov dx, COM1 + 5
        in al, dx                       # LSR
        test al, 1
        jz 47b
        mov dx, COM1
        in al, dx
        out dx, al                      # echo
        movzx eax, al
        imul r8, r8, 131
        add r8, rax
        cmp al, '.'
        jne 47b
        mov rdi, r8
        lea rsi, [msg_result]
        call print_labelled
        jmp user_done
.endif
.if (MODE == 7) || (MODE == 12)
.if MODE == 7
        mov r9, 64
.else
        mov r9, 100000
.endif
20:     mov rcx, 200000
21:     dec rcx
        jnz 21b
        rdtsc
        test eax, 0x400
        jz 22f
        mov al, 1
        out 0x80, al
        jmp 23f
22:     mov al, 2
        out 0x81, al
23:     dec r9
        jnz 20b
        xor rdi, rdi
        lea rsi, [msg_result]
        call print_labelled
        jmp user_done
.endif

user_done:
.if MODE == 2
        mov rdi, [counter]
        lea rsi, [msg_counter]
        call print_labelled
.endif
        mov rdi, [ticks]
        lea rsi, [msg_ticks]
        call print_labelled
        mov dx, 0x64
        mov al, 0xfe
        out dx, al                      # i8042 reset: the run ends
24:     jmp 24b

puts:
        mov dx, COM1
25:     lodsb
        test al, al
        jz 26f
        out dx, al
        jmp 25b
26:     ret

# print the string at rsi, then rdi as 16 hex digits and a newline
print_labelled:
        call puts
        mov rcx, 16
27:     rol rdi, 4
        mov rax, rdi
        and eax, 15
        lea rdx, [hexdigits]
        mov al, [rdx + rax]
        mov dx, COM1
        out dx, al
        dec rcx
        jnz 27b
        mov al, 10
        out dx, al
        ret

# ---------------------------------------------------------------- data
        .section .data
        .balign 16
gdt:    .quad 0
        .quad 0x00af9a000000ffff        # 0x08 kernel code
        .quad 0x00cf92000000ffff        # 0x10 kernel data
        .quad 0x00cff2000000ffff        # 0x18 user data (DPL3)
        .quad 0x00affa000000ffff        # 0x20 user code (DPL3, L)
gdt_tss:
        .quad 0, 0                      # 0x28 TSS (filled in)
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt
idt_ptr:
        .word 48 * 16 - 1
        .quad idt
hexdigits:  .ascii "0123456789abcdef"
msg_result: .asciz "RESULT "
msg_ticks:  .asciz "TICKS "
msg_counter: .asciz "COUNTER "
msg_fault:  .asciz "FAULT "
msg_ready:  .asciz "READY\n"
        .balign 8
ticks:  .quad 0
counter: .quad 0

        .section .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
idt:    .skip 4096
tss:    .skip 4096
        .skip 16384
kstack_top:
        .skip 16384
ustack_top:
        .balign 4096
scratch:
        .skip 4096 * 4096
