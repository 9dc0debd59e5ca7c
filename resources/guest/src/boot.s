# All ring-0 code of the test guest (AT&T syntax, included by src/boot.rs).
#
# Why so little runs here: on the PVM flavour of KVM that this project's
# machines use, guest code at CPL 0 is instruction-emulated (about a million
# instructions per second) while CPL 3 runs natively. So ring 0 only sets up
# the CPU (long mode, GDT/TSS/IDT, SSE) and drops to ring 3, where the Rust
# code does everything else. Interrupt and exception entry stubs live here
# too, because the CPU enters them at CPL 0; each is a handful of
# instructions. (There is no software-interrupt gate for ring 3: PVM answers
# `int n` in guest user mode with #UD instead of delivering it.)
#
# Two ways in, one way on:
#   pvh_entry32  PVH boot (QEMU -kernel, Xen-style loaders): 32-bit protected
#                mode, paging off, ebx = struct hvm_start_info.
#   elf_entry64  plain ELF64 boot (the ELF e_entry): long mode with some
#                identity map, rsi = Linux boot_params ("zero page").
# Both end in common64 with rdi = physical address of the command line.

.set KERNEL_CS, 0x08
.set KERNEL_DS, 0x10
.set USER_DS,   0x18
.set USER_CS,   0x20
.set TSS_SEL,   0x28

.set RFLAGS_USER,       0x3202      # IOPL=3, IF=1, reserved bit 1
.set RFLAGS_USER_NOIRQ, 0x3002      # IOPL=3, IF=0
.set LAPIC_EOI,         0xfee000b0
.set EXIT_PORT,         0xf4
.set EXIT_EXCEPTION,    3

# ---------------------------------------------------------------------------
# PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen", 8-byte
# descriptor holding the 32-bit entry address (the layout Linux uses).
.section .note.pvh, "a"
.p2align 2
    .long 4                         # namesz ("Xen\0")
    .long 8                         # descsz
    .long 18                        # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .quad pvh_entry32

# ---------------------------------------------------------------------------
.section .text.boot, "ax"

.code32
.global pvh_entry32
pvh_entry32:
    cli
    mov %ebx, %esi                  # hvm_start_info, survives the mode switch
    mov %cr4, %eax
    or $0x20, %eax                  # CR4.PAE: long mode needs PAE paging
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           # IA32_EFER
    rdmsr
    or $0x100, %eax                 # EFER.LME
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            # CR0.PG | CR0.PE: long mode becomes active
    mov %eax, %cr0
    lgdt gdt_ptr                    # 32-bit lgdt reads a 32-bit base: fine below 4 GiB
    ljmp $KERNEL_CS, $pvh_entry64

.code64
pvh_entry64:
    mov %esi, %esi                  # upper halves are undefined after the switch
    mov 24(%rsi), %rdi              # hvm_start_info.cmdline_paddr
    jmp common64

.global elf_entry64
elf_entry64:
    cli
    mov 0x228(%rsi), %edi           # boot_params.hdr.cmd_line_ptr
    mov 0x0c8(%rsi), %eax           # boot_params.ext_cmd_line_ptr (high 32 bits)
    shl $32, %rax
    or %rax, %rdi
    mov $pml4, %eax                 # our own map: the loader's may stop at 1 GiB
    mov %rax, %cr3
    lgdt gdt_ptr(%rip)

common64:
    lea kernel_stack_top(%rip), %rsp
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    pushq $KERNEL_CS                # reload CS from our GDT
    lea 1f(%rip), %rax
    push %rax
    lretq
1:
    # The TSS descriptor's base is scattered over four fields; filling it at
    # run time is a few instructions (the assembler cannot split an address).
    lea tss(%rip), %rax
    mov %ax, gdt_tss+2(%rip)        # base 15:0
    shr $16, %rax
    mov %al, gdt_tss+4(%rip)        # base 23:16
    mov %ah, gdt_tss+7(%rip)        # base 31:24
    shr $16, %rax
    mov %eax, gdt_tss+8(%rip)       # base 63:32
    mov $TSS_SEL, %ax
    ltr %ax
    # The IDT itself is filled by ring-3 Rust code (idt.rs) before it
    # enables anything that can interrupt: fewer emulated instructions here.
    lidt idt_ptr(%rip)
    mov %cr0, %rax
    and $~0xc, %rax                 # clear CR0.EM (2) and CR0.TS (3): SSE allowed
    or $0x22, %rax                  # CR0.MP (1), CR0.NE (5)
    mov %rax, %cr0
    mov %cr4, %rax
    or $0x600, %rax                 # CR4.OSFXSR | CR4.OSXMMEXCPT: Rust uses SSE
    mov %rax, %cr4
    # CPUID as a guest kernel sees it, for the `cpuid` test. On PVM hosts a
    # CPUID executed in ring 3 is not intercepted and returns the host CPU's
    # values, so it has to happen here, in ring 0: one pass over
    # cpuid_queries (leaf, subleaf) into cpuid_results (eax, ebx, ecx, edx).
    lea cpuid_queries(%rip), %r9
    lea cpuid_results(%rip), %r10
    mov $CPUID_QUERY_COUNT, %r8d
3:  mov (%r9), %eax
    mov 4(%r9), %ecx
    cpuid
    mov %eax, (%r10)
    mov %ebx, 4(%r10)
    mov %ecx, 8(%r10)
    mov %edx, 12(%r10)
    add $8, %r9
    add $16, %r10
    dec %r8d
    jnz 3b
    # Mask the legacy PIC: an unprogrammed PIC would deliver GSI n as vector
    # n (an exception vector) through the LAPIC's ExtINT pin.
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    # iretq to ring 3: SS, RSP, RFLAGS, CS, RIP. rdi (command line) is the
    # first argument of guest_main. RSP is 8 below a 16-byte boundary, as
    # if guest_main had been called.
    pushq $(USER_DS | 3)
    lea user_stack_top-8(%rip), %rax
    push %rax
    pushq $RFLAGS_USER
    pushq $(USER_CS | 3)
    lea guest_main(%rip), %rax
    push %rax
    iretq

# ---------------------------------------------------------------------------
# Exceptions 0..31. Each stub pushes a dummy error code where the CPU pushes
# none, then its vector. exception_common rewrites the interrupt frame so that
# iretq "returns" to the ring-3 Rust function report_exception(vector, error,
# rip) on a stack of its own; that function prints the contract's line and
# exits with status 3. A second exception while reporting exits at once.
.macro EXCEPTION_STUB vec
exception_stub_\vec:
.if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
.else
    pushq $0
.endif
    pushq $\vec
    jmp exception_common
.endm

.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
EXCEPTION_STUB \v
.endr

exception_common:
    cmpb $0, exception_reporting(%rip)
    jne exit_from_ring0
    movb $1, exception_reporting(%rip)
    pop %rdi                        # vector
    pop %rsi                        # error code
    mov (%rsp), %rdx                # faulting rip
    lea report_exception(%rip), %rax
    mov %rax, (%rsp)                # frame: rip
    movq $(USER_CS | 3), 8(%rsp)    #        cs
    movq $RFLAGS_USER_NOIRQ, 16(%rsp) #      rflags
    lea report_stack_top-8(%rip), %rax
    mov %rax, 24(%rsp)              #        rsp
    movq $(USER_DS | 3), 32(%rsp)   #        ss
    iretq

exit_from_ring0:
    mov $EXIT_EXCEPTION, %al
    out %al, $EXIT_PORT
2:  cli
    hlt
    jmp 2b

# ---------------------------------------------------------------------------
# Device interrupts: vector 0x30+i counts into irq_counts[i] (ring 3 spins on
# the counter), then EOI to the LAPIC. No registers beyond rax are touched.
.macro IRQ_STUB i
irq_stub_\i:
    incq irq_counts+8*\i(%rip)
    push %rax
    mov $LAPIC_EOI, %eax
    movl $0, (%rax)
    pop %rax
    iretq
.endm

.irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
IRQ_STUB \i
.endr

# The LAPIC's spurious vector needs no EOI.
.global spurious_interrupt
spurious_interrupt:
    iretq

# ---------------------------------------------------------------------------
.section .rodata
.p2align 3
.global exception_stubs
exception_stubs:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\v
.endr

# The leaves the ring-0 pass above reads (leaf, subleaf), in the order of
# cpuid::QUERIES in src/tests/cpuid.rs.
.global cpuid_queries
cpuid_queries:
    .long 0, 0
    .long 1, 0
    .long 4, 0
    .long 4, 1
    .long 4, 2
    .long 4, 3
    .long 0xb, 0
    .long 0xb, 1
    .long 0xb, 2
    .long 0x1f, 0
    .long 0x1f, 1
    .long 0x1f, 2
    .long 0x40000000, 0
    .long 0x40000001, 0
    .long 0x80000000, 0
    .long 0x80000001, 0
    .long 0x80000007, 0
    .long 0x80000008, 0
    .long 0x8000001d, 3
    .long 0x8000001e, 0
cpuid_queries_end:
.set CPUID_QUERY_COUNT, (cpuid_queries_end - cpuid_queries) / 8

.global irq_stubs
irq_stubs:
.irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .quad irq_stub_\i
.endr

# ---------------------------------------------------------------------------
.section .data.boot, "aw"

# Page tables: identity map of the first 4 GiB with 2 MiB pages, generated
# here so ring 0 spends no instructions on them. Every entry is
# PRESENT|RW|USER so ring 3 reaches RAM, virtio-mmio windows, the IOAPIC and
# the LAPIC. The top GiB (MMIO holes live there) is also cache-disabled.
.p2align 12
pml4:
    .quad pdpt + 0x7                # PRESENT | RW | USER
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
.set page_addr, 0
.rept 2048
.if page_addr >= 0xc0000000
    .quad page_addr + 0x9f          # PRESENT|RW|USER|PWT|PCD|PS(2 MiB)
.else
    .quad page_addr + 0x87          # PRESENT|RW|USER|PS(2 MiB)
.endif
.set page_addr, page_addr + 0x200000
.endr

# GDT. The user segments follow the SYSRET order (data, then code) out of
# habit; nothing here uses SYSRET.
.p2align 4
gdt:
    .quad 0                         # null
    .quad 0x00af9a000000ffff        # 0x08 kernel code, 64-bit
    .quad 0x00cf92000000ffff        # 0x10 kernel data
    .quad 0x00cff2000000ffff        # 0x18 user data (DPL 3)
    .quad 0x00affa000000ffff        # 0x20 user code, 64-bit (DPL 3)
gdt_tss:                            # 0x28 64-bit TSS descriptor (16 bytes)
    .word tss_end - tss - 1         # limit 15:0
    .word 0                         # base 15:0   (filled at boot)
    .byte 0                         # base 23:16  (filled at boot)
    .byte 0x89                      # present, type 9 = available 64-bit TSS
    .byte 0                         # limit 19:16, flags
    .byte 0                         # base 31:24  (filled at boot)
    .long 0                         # base 63:32  (filled at boot)
    .long 0
gdt_end:

gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

idt_ptr:
    .word 256 * 16 - 1
    .quad idt_table

# 64-bit TSS: rsp0 is the stack for interrupts taken in ring 3; the I/O
# permission bitmap allows every port. (On PVM, RFLAGS.IOPL=3 alone did not
# let ring 3 do port I/O once a real TSS was loaded; a zero bitmap does.)
.p2align 4
tss:
    .long 0                         # reserved
    .quad kernel_stack_top          # rsp0
    .quad 0                         # rsp1
    .quad 0                         # rsp2
    .quad 0                         # reserved
    .fill 7, 8, 0                   # ist1..ist7
    .quad 0                         # reserved
    .word 0                         # reserved
    .word io_bitmap - tss           # I/O map base
io_bitmap:
    .fill 8192, 1, 0                # one bit per port, 0 = allowed
    .byte 0xff                      # required terminator
tss_end:

.global exception_reporting
exception_reporting:
    .byte 0

# ---------------------------------------------------------------------------
.section .bss
.p2align 12
.global idt_table
idt_table:
    .fill 256 * 16, 1, 0

.global irq_counts
irq_counts:
    .fill 16, 8, 0

.global cpuid_results
cpuid_results:
    .fill CPUID_QUERY_COUNT * 16, 1, 0

.p2align 12
kernel_stack:
    .fill 16384, 1, 0
kernel_stack_top:

report_stack:
    .fill 16384, 1, 0
report_stack_top:

user_stack:
    .fill 262144, 1, 0
.global user_stack_top
user_stack_top:
